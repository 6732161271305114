"""Leave the user's model exactly as we found it, even when we raise."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, List

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


@contextmanager
def preserved_model_state(model: nn.Module) -> Iterator[List[RemovableHandle]]:
    """Record every module's ``training`` flag and every parameter's
    ``requires_grad``; yield a list to which callers append hook handles.

    On exit (normal or exceptional) the hooks are removed and the flags restored.
    """
    training = [(module, module.training) for module in model.modules()]
    requires_grad = [(p, p.requires_grad) for p in model.parameters()]
    handles: List[RemovableHandle] = []
    try:
        yield handles
    finally:
        for handle in handles:
            handle.remove()
        for module, flag in training:
            module.training = flag
        with torch.no_grad():
            for parameter, flag in requires_grad:
                parameter.requires_grad_(flag)
