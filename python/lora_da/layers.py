"""What lora-da knows about layer types, in one place.

A *target* is a linear-like module: ``nn.Linear`` (and its subclasses, e.g.
bitsandbytes' quantized linears, whose weight is not a float tensor) or
transformers' GPT-2 ``Conv1D`` (``y = x @ W + b``, weight stored ``d_in x d_out``).
Models already wrapped by PEFT are read through their LoRA layers' base layers.
One expert of fused MoE experts is a target too (:class:`lora_da.experts.ExpertSlice`:
``in_features``/``out_features`` and a ``weight`` slice, not a module).
Everything else in the package asks this module for a layer's shape, its weight
as ``d_out x d_in``, or its PEFT LoRA layers, instead of reading attributes.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import nn

from .experts import ExpertSlice

PEFT_PREFIX = "base_model.model."  # PEFT's prefix of the wrapped model's module names


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 style ``Conv1D``: ``y = x @ W + b`` with ``W`` of shape ``d_in x d_out``."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def is_linear_like(module: nn.Module) -> bool:
    """``nn.Linear`` (and subclasses such as bitsandbytes' quantized linears) or a GPT-2 ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_dims(module: nn.Module) -> Tuple[int, int]:
    """``(d_in, d_out)`` of a linear-like module, whatever its weight layout (never reads the weight's values)."""
    if is_conv1d(module):
        return int(module.weight.shape[0]), int(module.nf)
    return int(module.in_features), int(module.out_features)


def is_expert_slice(module: object) -> bool:
    """One expert of a fused MoE experts parameter (:class:`lora_da.experts.ExpertSlice`)."""
    return isinstance(module, ExpertSlice)


def require_float_weight(name: str, module: nn.Module) -> torch.Tensor:
    """The module's weight tensor; ``TypeError`` naming the module when it is not floating point
    (int8/4-bit quantized bases: methods that read ``W`` cannot serve them) or when it holds no
    values (on the ``meta`` device: a model dispatched with an offloading ``device_map``)."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        dtype = weight.dtype if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise TypeError(
            f"module '{name}' has a {dtype} weight: this method reads W and needs a floating-point weight "
            "(dequantize the base model, or use a method that reads no weight)"
        )
    if weight.is_meta:
        raise TypeError(
            f"module '{name}' has its weight on the meta device (offloaded by a device_map?): this method reads W "
            "and needs its values (load the model without offloading, or use a method that reads no weight)"
        )
    return weight


def weight_matrix(name: str, module: nn.Module) -> torch.Tensor:
    """``W`` as ``d_out x d_in`` float64 (GPT-2 ``Conv1D`` and transposed experts store ``Wᵀ``);
    refuses non-float and meta weights by name."""
    w = require_float_weight(name, module).detach().to(torch.float64)
    transposed = is_conv1d(module) or (is_expert_slice(module) and module.transposed)
    return w.T if transposed else w


def output_head(model: nn.Module) -> Optional[nn.Module]:
    """``model.get_output_embeddings()`` when the model defines it (the LM head is no target by default)."""
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        try:
            return getter()
        except (NotImplementedError, AttributeError):
            return None
    return None


def peft_base_layers(model: nn.Module) -> Dict[str, nn.Module]:
    """For a model already wrapped by PEFT: ``{name: base layer}`` of its LoRA
    layers, named without PEFT's ``base_model.model.`` prefix."""
    layers = {}
    for name, module in model.named_modules():
        if isinstance(getattr(module, "lora_A", None), nn.ModuleDict) and hasattr(module, "get_base_layer"):
            clean = name[len(PEFT_PREFIX) :] if name.startswith(PEFT_PREFIX) else name
            layers[clean] = module.get_base_layer()
    return layers


def peft_lora_layers(peft_model: nn.Module, adapter_name: str) -> Dict[str, nn.Module]:
    """Every PEFT LoRA layer of ``peft_model`` holding ``adapter_name``, by full module name."""
    layers = {}
    for name, module in peft_model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if isinstance(lora_a, nn.ModuleDict) and adapter_name in lora_a:
            layers[name] = module
    return layers


def stores_transposed_weight(peft_layer: nn.Module) -> bool:
    """True for a PEFT LoRA layer whose base weight is stored ``d_in x d_out`` (GPT-2 ``Conv1D``)."""
    return bool(getattr(peft_layer, "fan_in_fan_out", False))
