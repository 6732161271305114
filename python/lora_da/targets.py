"""Which modules LoRA-DA initializes."""

from __future__ import annotations

import re
from typing import Dict

from torch import nn

from .config import TargetModules


def _output_head(model: nn.Module):
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        try:
            return getter()
        except (NotImplementedError, AttributeError):
            return None
    return None


def _matches(name: str, target_modules: TargetModules) -> bool:
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def find_target_modules(model: nn.Module, target_modules: TargetModules, rank: int) -> Dict[str, nn.Linear]:
    """Return ``{name: module}`` of the ``nn.Linear`` modules to initialize.

    ``None`` selects every ``nn.Linear`` except the output head
    (``model.get_output_embeddings()`` when the model defines it). A list of
    names uses PEFT's suffix rule; a string is a full-match regular expression.
    Raises ``ValueError`` when nothing matches, when a matched module is not an
    ``nn.Linear``, or when ``rank`` exceeds ``min(d_in, d_out)`` of a module.
    """
    if target_modules is not None and not isinstance(target_modules, str):
        target_modules = list(target_modules)
        if not target_modules or not all(isinstance(t, str) for t in target_modules):
            raise ValueError(f"target_modules must be None, a regex string or a non-empty list of names, got {target_modules!r}")
    head = _output_head(model)
    found: Dict[str, nn.Linear] = {}
    for name, module in model.named_modules():
        if not name:
            continue
        if target_modules is None:
            if isinstance(module, nn.Linear) and module is not head:
                found[name] = module
        elif _matches(name, target_modules):
            if not isinstance(module, nn.Linear):
                raise ValueError(
                    f"target module '{name}' is a {type(module).__name__}, not an nn.Linear; "
                    "LoRA-DA initializes nn.Linear modules only"
                )
            found[name] = module
    if not found:
        raise ValueError(
            f"no module of {type(model).__name__} matched target_modules={target_modules!r}"
        )
    for name, module in found.items():
        limit = min(module.in_features, module.out_features)
        if rank > limit:
            raise ValueError(
                f"rank={rank} exceeds min(d_in, d_out)={limit} of module '{name}' "
                f"(weight {module.out_features} x {module.in_features})"
            )
    return found
