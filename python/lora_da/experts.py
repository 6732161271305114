"""Fused MoE experts: which modules hold them, and one expert's matrix as a target.

transformers 5.x stores the experts of Qwen2/3-MoE, Mixtral, OLMoE, DeepSeek-V3,
GPT-OSS, GraniteMoE (every class decorated with ``use_experts_implementation``)
as 3-D parameters ``experts.gate_up_proj`` (or ``up_proj``) and
``experts.down_proj`` of shape ``(E, d_out, d_in)`` (``is_transposed``:
``(E, d_in, d_out)``). Expert ``e`` of parameter ``p`` of module ``m`` is the
target :class:`ExpertSlice` named ``"m.e.p"`` (e.g.
``model.layers.3.mlp.experts.5.gate_up_proj``): its ``W`` is ``p[e]``
(``d_out x d_in``), its inputs are the tokens routed to expert ``e``
(:mod:`lora_da.expert_collector` captures them). In a PEFT adapter all the
experts of one parameter are one ``target_parameters`` LoRA layer
(:mod:`lora_da.peft_glue`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

#: the fused parameters of a served experts module, in PEFT's nesting order (registration order)
GATED_PARAMETERS = ("gate_up_proj", "down_proj")
UNGATED_PARAMETERS = ("up_proj", "down_proj")


@dataclass(eq=False)
class ExpertSlice:
    """Expert ``index`` of the fused parameter ``parameter_name`` of ``experts``: a target
    with ``in_features``/``out_features`` like an ``nn.Linear`` (it is not a module)."""

    experts: nn.Module
    module_name: str
    parameter_name: str
    index: int
    in_features: int
    out_features: int
    transposed: bool  # the parameter is stored (E, d_in, d_out)

    @property
    def weight(self) -> torch.Tensor:
        """This expert's slice of the fused parameter, as stored (``d_in x d_out`` when :attr:`transposed`)."""
        return getattr(self.experts, self.parameter_name)[self.index]

    @property
    def parameter_key(self) -> str:
        """The fused parameter's full name (PEFT's ``target_parameters`` entry)."""
        return f"{self.module_name}.{self.parameter_name}"


def expert_name(module_name: str, index: int, parameter_name: str) -> str:
    """The target name of one expert's matrix: ``model.layers.3.mlp.experts.5.gate_up_proj``."""
    return f"{module_name}.{index}.{parameter_name}"


def looks_like_experts(module: nn.Module) -> bool:
    """A module that holds stacked experts itself (served or not): a 3-D parameter of its own,
    and a class name ending in ``Experts`` or a ``num_experts`` equal to that parameter's leading size.
    (``nn.Linear`` experts in a container, e.g. SwitchTransformers', are ordinary linear targets.)"""
    stacked = [p for p in module.parameters(recurse=False) if p.dim() == 3]
    if not stacked:
        return False
    if type(module).__name__.endswith("Experts"):
        return True
    count = getattr(module, "num_experts", None)
    return isinstance(count, int) and any(p.shape[0] == count for p in stacked)


def fused_parameters(module: nn.Module) -> Optional[Tuple[str, ...]]:
    """The fused parameter names of an experts module whose computation lora-da reproduces
    (transformers' ``use_experts_implementation`` layout, see the module doc); ``None`` otherwise."""
    flags = [getattr(module, flag, None) for flag in ("has_gate", "has_bias", "is_transposed")]
    count = getattr(module, "num_experts", None)
    if not all(isinstance(flag, bool) for flag in flags) or not isinstance(count, int) or count < 1:
        return None
    if getattr(module, "_is_expert_parallel", False):
        return None
    has_gate, has_bias, _ = flags
    names = GATED_PARAMETERS if has_gate else UNGATED_PARAMETERS
    own = dict(module.named_parameters(recurse=False))
    for name in names:
        parameter = own.get(name)
        if parameter is None or parameter.dim() != 3 or parameter.shape[0] != count:
            return None
        if has_bias and own.get(f"{name}_bias") is None:
            return None
    if has_gate and not callable(getattr(module, "_apply_gate", None)):
        return None
    if not has_gate and not callable(getattr(module, "act_fn", None)):
        return None
    if getattr(module, "has_post_expert_norm", False) and not callable(getattr(module, "post_expert_norm", None)):
        return None
    return names


def expert_dims(module: nn.Module, parameter_name: str) -> Tuple[int, int]:
    """``(d_in, d_out)`` of one expert of a fused parameter."""
    shape = getattr(module, parameter_name).shape
    return (int(shape[1]), int(shape[2])) if module.is_transposed else (int(shape[2]), int(shape[1]))


def expert_slices(module_name: str, module: nn.Module, parameter_names: Tuple[str, ...]) -> Dict[str, ExpertSlice]:
    """Every expert of each of ``parameter_names`` (in that order, experts in index order)."""
    found = {}
    for parameter_name in parameter_names:
        d_in, d_out = expert_dims(module, parameter_name)
        for index in range(module.num_experts):
            found[expert_name(module_name, index, parameter_name)] = ExpertSlice(
                module, module_name, parameter_name, index, d_in, d_out, bool(module.is_transposed)
            )
    return found


@dataclass(frozen=True)
class ExpertEntry:
    """Where one expert target sits (kept in :attr:`lora_da.LoraInit.experts`)."""

    module: str  # the experts module's name
    parameter: str  # the fused parameter
    index: int  # the expert
    nesting: int  # how many targeted fused parameters of this module PEFT wraps around this one


def expert_layout(targets: Dict[str, object]) -> Dict[str, ExpertEntry]:
    """``{target name: ExpertEntry}`` of the expert targets. PEFT wraps the targeted parameters
    of one module in their registration order, each wrapper around the previous one, so the
    parameter registered first sits deepest (``.base_layer`` once per later one)."""
    by_module: Dict[str, List[str]] = {}
    slices = {name: t for name, t in targets.items() if isinstance(t, ExpertSlice)}
    for target in slices.values():
        targeted = by_module.setdefault(target.module_name, [])
        if target.parameter_name not in targeted:
            targeted.append(target.parameter_name)
    order = {}
    for target in slices.values():
        registered = [n for n, _ in target.experts.named_parameters(recurse=False)]
        targeted = sorted(by_module[target.module_name], key=registered.index)
        order[target.module_name] = targeted
    return {
        name: ExpertEntry(
            module=t.module_name,
            parameter=t.parameter_name,
            index=t.index,
            nesting=len(order[t.module_name]) - 1 - order[t.module_name].index(t.parameter_name),
        )
        for name, t in slices.items()
    }
