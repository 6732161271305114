"""Which modules an initialization covers (layer types: :mod:`lora_da.layers`)."""

from __future__ import annotations

import re
from typing import Dict

from torch import nn

from .config import TargetModules
from .layers import is_linear_like, linear_dims, output_head, peft_base_layers


def _matches(name: str, target_modules: TargetModules) -> bool:
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def find_target_modules(model: nn.Module, target_modules: TargetModules, rank: int) -> Dict[str, nn.Linear]:
    """Return ``{name: module}`` of the ``nn.Linear`` modules to initialize.

    ``None`` selects every ``nn.Linear`` (and GPT-2 ``Conv1D``) except the output
    head (``model.get_output_embeddings()`` when the model defines it). A list of
    names uses PEFT's suffix rule; a string is a full-match regular expression.
    On a model already wrapped by PEFT, the candidates are its LoRA layers (their
    base layers are hooked), named without the ``base_model.model.`` prefix.
    Raises ``ValueError`` when nothing matches, when a matched module is not an
    ``nn.Linear``, or when ``rank`` exceeds ``min(d_in, d_out)`` of a module.
    """
    if target_modules is not None and not isinstance(target_modules, str):
        target_modules = list(target_modules)
        if not target_modules or not all(isinstance(t, str) for t in target_modules):
            raise ValueError(f"target_modules must be None, a regex string or a non-empty list of names, got {target_modules!r}")
    head = output_head(model)
    peft_layers = peft_base_layers(model)
    if peft_layers:  # a PEFT model: initialize its LoRA layers, hooking their base layers
        candidates = list(peft_layers.items())
    else:
        candidates = [(name, module) for name, module in model.named_modules() if name]
    found: Dict[str, nn.Module] = {}
    for name, module in candidates:
        if target_modules is None:
            if is_linear_like(module) and module is not head:
                found[name] = module
        elif _matches(name, target_modules):
            if not is_linear_like(module):
                raise ValueError(
                    f"target module '{name}' is a {type(module).__name__}, not an nn.Linear; "
                    "LoRA-DA initializes nn.Linear (and GPT-2 Conv1D) modules only"
                )
            found[name] = module
    if not found:
        raise ValueError(
            f"no module of {type(model).__name__} matched target_modules={target_modules!r}"
        )
    for name, module in found.items():
        d_in, d_out = linear_dims(module)
        if rank > min(d_in, d_out):
            raise ValueError(
                f"rank={rank} exceeds min(d_in, d_out)={min(d_in, d_out)} of module '{name}' "
                f"(d_in {d_in}, d_out {d_out})"
            )
    return found
