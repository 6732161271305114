"""``lora``: PEFT's default init, Kaiming-uniform ``A`` and ``B = 0`` (docs/math.md §6.1).

Reads no data and no weight; the base weight is unchanged.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch
from torch import nn

from ..layers import linear_dims
from .base import NO_STATISTICS, Method, Solution, SolveContext, register, solve_each


def kaiming_lora_factors(d_in: int, d_out: int, rank: int, generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """PEFT's default: ``A`` Kaiming-uniform with ``a=√5`` (bound ``1/√d_in``), ``B = 0``."""
    lora_A = torch.empty(rank, d_in, dtype=torch.float32)
    nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5), generator=generator)
    return lora_A, torch.zeros(d_out, rank, dtype=torch.float32)


def solve(context: SolveContext) -> Solution:
    """One generator seeded with ``seed``, drawing the modules in model order."""
    generator = torch.Generator().manual_seed(context.settings.seed)

    def factors(name: str) -> tuple:
        d_in, d_out = linear_dims(context.targets[name])
        lora_A, lora_B = kaiming_lora_factors(d_in, d_out, context.settings.rank, generator)
        return lora_A, lora_B, torch.zeros(0), 0.0

    return solve_each(context, "lora", factors)


METHOD = register(
    Method(
        name="lora",
        solve=solve,
        statistics=NO_STATISTICS,
    )
)
