"""Experts that saw too few calibration tokens: PEFT's default init instead (docs/math.md §2.1).

The same holds for ``nn.Linear`` experts in a container (SwitchTransformers), whose
statistics also count their own routed tokens. A data-aware method estimates ``Z_e``, ``y_e`` and ``G_e`` of expert ``e`` from
the tokens routed to it. An expert that got fewer than ``rank`` kept tokens
(often none: routing is sparse) gives no usable estimate, so it gets the
``lora`` method's init (Kaiming-uniform ``A``, ``B = 0``: the adapter starts as the
base model there) and is counted in :attr:`lora_da.LoraInit.expert_fallbacks`.
"""

from __future__ import annotations

from typing import Dict

import torch

from .experts import ExpertSlice
from .layers import linear_dims
from .methods.base import SolveContext
from .methods.lora import kaiming_lora_factors
from .module_init import ModuleInit, make_module_init


def take_sparse_experts(context: SolveContext) -> Dict[str, ModuleInit]:
    """Remove from ``context.names`` the expert targets with fewer than ``rank`` tokens
    (none without statistics: methods that read no data serve every expert) and return
    their fallback inits, drawn in target order from a generator seeded with ``seed``."""
    stats = context.statistics
    if stats is None:
        return {}
    rank = context.settings.rank
    sparse = [
        name
        for name in context.names
        if (isinstance(context.targets[name], ExpertSlice) or name in stats.routed)
        and (name not in stats.modules or stats.tokens(name) < rank)
    ]
    if not sparse:
        return {}
    generator = torch.Generator().manual_seed(context.settings.seed)
    inits = {}
    for name in sparse:
        d_in, d_out = linear_dims(context.targets[name])
        lora_A, lora_B = kaiming_lora_factors(d_in, d_out, rank, generator)
        inits[name] = make_module_init(name, lora_A, lora_B, torch.zeros(0), 0.0)
    context.names = [name for name in context.names if name not in inits]
    return inits
