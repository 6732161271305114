"""The statistics pass under the user's activation checkpointing (docs/math.md §2).

transformers checkpoints a layer (``GradientCheckpointingLayer``) only in training
mode, with gradients enabled. When the user turned checkpointing on
(``model.gradient_checkpointing_enable()``, reentrant or not), the pass keeps it on:
every module is put in eval mode (no dropout) except the checkpointed layers and the
containers that carry the same flag (whose ``use_cache`` logic follows it), which are put
in training mode; :func:`lora_da.model_state.preserved_model_state` restores every flag.
Those modules read ``self.training`` only to decide on checkpointing and caching in
transformers; dropout lives in their submodules (attention, ``nn.Dropout``), which stay
in eval mode.

The hooks then see each checkpointed layer's forward twice: the first forward counts
(``Z``, token counts, NaN tracing) and the recomputation during the backward only hands
its input back for ``G`` (:meth:`lora_da.collector.Collector._on_recompute`); the first
forward does not keep the inputs of modules inside a checkpointed layer, so the pass
holds no more activations than the checkpointed training step does. Non-reentrant
checkpoints run with early stopping off (every target of the layer is recomputed);
reentrant ones need the layer input to require a gradient (a zero "anchor" is added to
the first layer's input) and ``backward()`` instead of ``torch.autograd.grad``.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Dict, FrozenSet, Iterator, List

import torch
from torch import nn
from torch.utils.checkpoint import set_checkpoint_early_stop

try:  # transformers is optional: without it no model has such layers
    from transformers.modeling_layers import GradientCheckpointingLayer
except ImportError:  # pragma: no cover - the test environment has transformers
    GradientCheckpointingLayer = None


def checkpointed_layers(model: nn.Module) -> List[nn.Module]:
    """The layers of ``model`` that activation checkpointing wraps (flag on)."""
    if GradientCheckpointingLayer is None:
        return []
    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]


def checkpointed_targets(layers: List[nn.Module], modules: Dict[str, nn.Module]) -> FrozenSet[str]:
    """The target modules that run inside a checkpointed layer."""
    inside = {id(sub) for layer in layers for sub in layer.modules()}
    return frozenset(name for name, module in modules.items() if id(module) in inside)


def set_pass_modes(model: nn.Module, layers: List[nn.Module]) -> None:
    """Eval mode everywhere, except the checkpointed layers and the flagged modules that
    contain one (training mode: transformers checkpoints and disables the cache only then)."""
    model.eval()
    if not layers:
        return
    layer_ids = {id(layer) for layer in layers}
    for module in model.modules():
        if id(module) in layer_ids:
            module.training = True
        elif getattr(module, "gradient_checkpointing", False) is True and any(
            id(sub) in layer_ids for sub in module.modules()
        ):
            module.training = True


def anchor_layer_inputs(layers: List[nn.Module], anchor: Callable[[], torch.Tensor]) -> list:
    """Forward pre-hooks that make a checkpointed layer's first input require a gradient
    (``+ 0·anchor``) when it does not (frozen embeddings): a reentrant checkpoint whose
    inputs need no gradient is never backpropagated. Returns the handles."""

    def hook(module: nn.Module, args: tuple):
        if not args or not isinstance(args[0], torch.Tensor) or not args[0].is_floating_point():
            return None
        if args[0].requires_grad or not torch.is_grad_enabled():
            return None
        zero = anchor()
        if zero is None:
            return None
        return (args[0] + zero.to(args[0].dtype),) + tuple(args[1:])

    return [layer.register_forward_pre_hook(hook) for layer in layers]


@contextlib.contextmanager
def recomputing_every_target(layers: List[nn.Module]) -> Iterator[None]:
    """Non-reentrant checkpoints without early stopping (only while layers are checkpointed)."""
    if not layers:
        yield
        return
    with set_checkpoint_early_stop(False):
        yield
