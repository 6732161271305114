"""Expert LoRAs in PEFT: one ``target_parameters`` layer (``lora.ParamWrapper``) per fused parameter.

PEFT 0.21 stores the LoRA of a fused parameter of ``E`` experts at rank ``r`` as
``lora_A`` of shape ``(r·E, d_in)`` — expert ``e``'s ``A_e`` in rows
``e·r … e·r + r − 1`` — and ``lora_B`` of shape ``(d_out, r·E)`` — expert ``e``'s
``B_e`` in columns ``e, e + E, e + 2E, …`` — and adds ``s·B_e·A_e`` to expert
``e``'s ``W_e`` (``d_out x d_in``; transposed for ``is_transposed`` parameters).
The targeted parameters of one module are nested wrappers, the parameter
registered first deepest (:func:`lora_da.experts.expert_layout`), which gives
the adapter file's keys. :mod:`lora_da.peft_glue` calls these for the experts
of a :class:`~lora_da.LoraInit`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Dict, List, Tuple

import torch
from torch import nn

from .layers import PEFT_PREFIX

if TYPE_CHECKING:  # pragma: no cover - annotations only
    from .result import LoraInit

Factors = Callable[[str, float], Tuple[torch.Tensor, torch.Tensor]]  # (name, scaling) -> (A, B)
BASE_LAYER = ".base_layer"


def expert_groups(init: "LoraInit") -> Dict[Tuple[str, str], List[str]]:
    """``{(module, parameter): [target names in expert order]}``; ``ValueError`` unless every
    expert ``0 … E−1`` of a parameter is in the init, all at one rank."""
    groups: Dict[Tuple[str, str], Dict[int, str]] = {}
    for name, entry in init.experts.items():
        if name in init.modules:
            groups.setdefault((entry.module, entry.parameter), {})[entry.index] = name
    result = {}
    for (module, parameter), by_index in groups.items():
        if sorted(by_index) != list(range(len(by_index))):
            raise ValueError(f"experts of '{module}.{parameter}' are not all in this LoraInit (indices {sorted(by_index)})")
        names = [by_index[i] for i in range(len(by_index))]
        ranks = {init.modules[n].rank for n in names}
        if len(ranks) != 1:
            raise ValueError(f"experts of '{module}.{parameter}' have ranks {sorted(ranks)}; PEFT gives them one rank")
        result[(module, parameter)] = names
    return result


def parameter_keys(init: "LoraInit") -> List[str]:
    """PEFT ``target_parameters``: the fused parameters' full names, sorted."""
    return sorted(f"{module}.{parameter}" for module, parameter in expert_groups(init))


def pack(init: "LoraInit", names: List[str], scaling: float, factors: Factors) -> Tuple[torch.Tensor, torch.Tensor]:
    """PEFT's ``(lora_A, lora_B)`` of one fused parameter from its experts' factors (float32, CPU)."""
    pairs = [factors(name, scaling) for name in names]
    count, rank = len(pairs), pairs[0][0].shape[0]
    lora_A = torch.cat([a.detach().to("cpu", torch.float32) for a, _ in pairs], dim=0)
    stacked_B = torch.stack([b.detach().to("cpu", torch.float32) for _, b in pairs], dim=-1)  # (d_out, r, E)
    lora_B = stacked_B.reshape(stacked_B.shape[0], rank * count)  # column k·E + e is B_e[:, k]
    return lora_A.contiguous(), lora_B.contiguous()


def adapter_tensors(init: "LoraInit", scaling_of: Callable[[int], float], factors: Factors) -> Dict[str, torch.Tensor]:
    """The adapter file's tensors of every fused parameter (``scaling_of(rank)``: the layer's ``s``)."""
    tensors = {}
    for (module, parameter), names in expert_groups(init).items():
        nesting = init.experts[names[0]].nesting
        lora_A, lora_B = pack(init, names, scaling_of(init.modules[names[0]].rank), factors)
        prefix = f"{PEFT_PREFIX}{module}{BASE_LAYER * nesting}"
        tensors[f"{prefix}.lora_A.weight"] = lora_A
        tensors[f"{prefix}.lora_B.weight"] = lora_B
    return tensors


def parameter_layers(peft_model: nn.Module, adapter_name: str) -> Dict[Tuple[str, str], nn.Module]:
    """``{(module name without PEFT's wrappers, parameter): ParamWrapper}`` holding ``adapter_name``."""
    layers = {}
    for name, module in peft_model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        parameter = getattr(module, "parameter_name", None)
        if isinstance(lora_a, nn.ModuleDict) and adapter_name in lora_a and isinstance(parameter, str):
            clean = name[len(PEFT_PREFIX) :] if name.startswith(PEFT_PREFIX) else name
            layers[(clean.replace(BASE_LAYER, ""), parameter)] = module
    return layers


def _find(layers: Dict[Tuple[str, str], nn.Module], module: str, parameter: str) -> nn.Module:
    matches = [key for key in layers if key[1] == parameter and (key[0] == module or key[0].endswith("." + module))]
    if len(matches) != 1:
        what = "no" if not matches else f"{len(matches)}"
        raise ValueError(
            f"experts '{module}.{parameter}' of this LoraInit have {what} matching PEFT target_parameters LoRA layers "
            "(make the PEFT model with target_parameters, e.g. lora_da.peft_glue.get_peft_model_with_init)"
        )
    return layers[matches[0]]


def apply_experts(
    init: "LoraInit", peft_model: nn.Module, adapter_name: str, factors: Factors, offset: bool
) -> List[nn.Module]:
    """Write every fused parameter's packed factors into its ParamWrapper (keeping dtype and
    device); with ``offset``, ``W_e ← W_e − s·B_e·A_e`` from the written factors. Returns the layers."""
    layers = parameter_layers(peft_model, adapter_name)
    plan = []
    for (module, parameter), names in expert_groups(init).items():
        layer = _find(layers, module, parameter)
        a_param, b_param = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
        rank = init.modules[names[0]].rank
        if layer.num_experts != len(names) or tuple(a_param.shape) != (rank * len(names), init.modules[names[0]].lora_A.shape[1]):
            raise ValueError(
                f"experts '{module}.{parameter}': PEFT lora_A {tuple(a_param.shape)} for {layer.num_experts} experts does not "
                f"match LoraInit's {len(names)} experts at rank {rank} (is the LoraConfig's r the rank used in initialize?)"
            )
        if offset and not layer.get_param().is_floating_point():
            raise TypeError(f"experts '{module}.{parameter}': the base weight is {layer.get_param().dtype}; this init changes W")
        plan.append((layer, a_param, b_param, names))
    with torch.no_grad():
        for layer, a_param, b_param, names in plan:
            lora_A, lora_B = pack(init, names, float(layer.scaling[adapter_name]), factors)
            a_param.copy_(lora_A.to(device=a_param.device, dtype=a_param.dtype))
            b_param.copy_(lora_B.to(device=b_param.device, dtype=b_param.dtype))
            if offset:
                offset_experts(layer, adapter_name)
    return [layer for layer, *_ in plan]


def offset_experts(layer: nn.Module, adapter_name: str) -> None:
    """``W ← W − ΔW`` for every expert, ``ΔW`` as PEFT computes it from the layer's (cast) factors."""
    param = layer.get_param()
    delta = layer.get_delta_weight(adapter_name)  # (E, d_out, d_in), or (E, d_in, d_out) when transposed
    with torch.no_grad():
        param.copy_((param.to(torch.float32) - delta.to(param.device, torch.float32)).to(param.dtype))


def offset_loaded_experts(peft_model: nn.Module, report: dict, adapter_name: str) -> None:
    """For :func:`lora_da.peft_glue.load_init_adapter`: the offset of every fused parameter in ``report``."""
    layers = parameter_layers(peft_model, adapter_name)
    seen = set()
    for entry in report.get("experts", {}).values():
        key = (entry["module"], entry["parameter"])
        if key not in seen:
            seen.add(key)
            offset_experts(_find(layers, *key), adapter_name)
