"""Writing LoRA factors into PEFT models and PEFT adapter directories."""

from __future__ import annotations

import json
import os
import warnings
from typing import TYPE_CHECKING, Dict, Optional

import torch
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from .result import LoraInit


def _lora_layers(peft_model: nn.Module, adapter_name: str) -> Dict[str, nn.Module]:
    """Every PEFT LoRA layer holding ``adapter_name``, by module name."""
    layers = {}
    for name, module in peft_model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if isinstance(lora_a, nn.ModuleDict) and adapter_name in lora_a:
            layers[name] = module
    return layers


def _find_layer(layers: Dict[str, nn.Module], name: str) -> nn.Module:
    matches = [full for full in layers if full == name or full.endswith("." + name)]
    if len(matches) != 1:
        what = "no" if not matches else f"{len(matches)} ({matches})"
        raise ValueError(f"module '{name}' of this LoraInit has {what} matching PEFT LoRA layers")
    return layers[matches[0]]


def apply_to_peft_model(init: "LoraInit", peft_model: nn.Module, adapter_name: str = "default") -> None:
    """Copy ``init``'s factors into ``peft_model``'s LoRA layers (see :meth:`LoraInit.apply`)."""
    layers = _lora_layers(peft_model, adapter_name)
    if not layers:
        raise ValueError(f"the model has no PEFT LoRA layer with adapter '{adapter_name}'")
    plan = []
    for name, module_init in init.modules.items():
        layer = _find_layer(layers, name)
        a_param = layer.lora_A[adapter_name].weight
        b_param = layer.lora_B[adapter_name].weight
        if tuple(a_param.shape) != tuple(module_init.lora_A.shape) or tuple(b_param.shape) != tuple(
            module_init.lora_B.shape
        ):
            raise ValueError(
                f"module '{name}': PEFT lora_A {tuple(a_param.shape)} / lora_B {tuple(b_param.shape)} do not match "
                f"LoraInit's {tuple(module_init.lora_A.shape)} / {tuple(module_init.lora_B.shape)} "
                "(is the LoraConfig's r the rank used in initialize?)"
            )
        if getattr(layer, "use_dora", {}).get(adapter_name, False):
            raise ValueError(f"module '{name}': DoRA layers are not supported by LoRA-DA's init")
        plan.append((name, layer, a_param, b_param, module_init))
    covered = {id(layer) for _, layer, *_ in plan}
    uncovered = [full for full, layer in layers.items() if id(layer) not in covered]
    if uncovered:
        warnings.warn(
            f"{len(uncovered)} LoRA layers of adapter '{adapter_name}' are not covered by this LoraInit "
            f"and keep PEFT's default init (e.g. '{uncovered[0]}')",
            stacklevel=3,
        )
    with torch.no_grad():
        for name, layer, a_param, b_param, module_init in plan:
            a_param.copy_(module_init.lora_A.to(device=a_param.device, dtype=a_param.dtype))
            b_param.copy_(module_init.lora_B.to(device=b_param.device, dtype=b_param.dtype))
            if init.config.preserve_output:
                base = layer.get_base_layer().weight
                scaling = float(layer.scaling[adapter_name])
                # The adapted layer will add s·B·A computed from the stored (cast) factors.
                delta = scaling * (b_param.to(torch.float32) @ a_param.to(torch.float32))
                if getattr(layer, "fan_in_fan_out", False):  # GPT-2 Conv1D stores W as d_in x d_out
                    delta = delta.T
                base.copy_((base.to(torch.float32) - delta.to(base.device)).to(base.dtype))


ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"


def save_adapter(
    init: "LoraInit",
    save_directory: str,
    *,
    lora_alpha: Optional[float] = None,
    use_rslora: bool = False,
    base_model_name_or_path: Optional[str] = None,
) -> None:
    """Write a PEFT adapter directory (see :meth:`LoraInit.save_pretrained`)."""
    if init.config.preserve_output:
        raise ValueError(
            "this LoraInit was made with preserve_output=True, which changes the base weights: "
            "a plain adapter on the unmodified base cannot reproduce it. Save the PEFT model after "
            "apply() together with its modified base, or initialize with preserve_output=False"
        )
    try:
        from peft import LoraConfig
    except ImportError as error:  # pragma: no cover
        raise ImportError("save_pretrained needs peft: pip install 'lora-da[hf]'") from error
    from safetensors.torch import save_file

    config_kwargs = dict(
        r=init.config.rank,
        target_modules=sorted(init.modules),
        use_rslora=use_rslora,
        base_model_name_or_path=base_model_name_or_path,
        init_lora_weights=True,
    )
    if lora_alpha is not None:
        config_kwargs["lora_alpha"] = lora_alpha
    config = LoraConfig(**config_kwargs)
    tensors = {}
    for name, module_init in init.modules.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = module_init.lora_A.detach().to("cpu").contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = module_init.lora_B.detach().to("cpu").contiguous()
    os.makedirs(save_directory, exist_ok=True)
    config.save_pretrained(save_directory)
    save_file(tensors, os.path.join(save_directory, ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(save_directory, "lora_da_init.json"), "w") as f:
        json.dump(init.report(), f, indent=2)
