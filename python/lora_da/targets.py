"""Which modules an initialization covers (layer types: :mod:`lora_da.layers`, experts: :mod:`lora_da.experts`)."""

from __future__ import annotations

import re
from typing import Dict, List, Tuple

from torch import nn

from .config import TargetModules
from .experts import expert_slices, fused_parameters, looks_like_experts
from .layers import is_linear_like, linear_dims, output_head, peft_base_layers
from .naming import module_kind
from .user_warnings import TargetsWarning, warn_user

#: Output heads of the task types (PEFT's ``modules_to_save`` heads: sequence and token
#: classification, question answering): never default targets, nor anything under them.
HEAD_NAMES = ("classifier", "score", "qa_outputs")


def _matches(name: str, target_modules: TargetModules) -> bool:
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def _is_head(name: str) -> bool:
    return any(part in HEAD_NAMES for part in name.split("."))


def _is_modules_to_save(module: nn.Module) -> bool:
    """PEFT's ``ModulesToSaveWrapper`` (a head trained in full, not by LoRA)."""
    return type(module).__name__ == "ModulesToSaveWrapper" or isinstance(getattr(module, "modules_to_save", None), nn.ModuleDict)


def _summarize(names: List[str]) -> str:
    """The names, those of one kind (layer index starred) once with their count."""
    kinds: Dict[str, List[str]] = {}
    for name in names:
        kinds.setdefault(module_kind(name), []).append(name)
    return ", ".join(
        f"'{members[0]}'" if len(members) == 1 else f"'{kind}' ({len(members)})" for kind, members in kinds.items()
    )


def _default_targets(model: nn.Module, rank: int) -> Tuple[Dict[str, object], Dict[str, List[str]]]:
    """Every linear and every served expert, but the output heads and what is smaller than
    ``rank``; and what was left out, by reason."""
    head = output_head(model)
    found: Dict[str, object] = {}
    small = f"smaller than rank {rank}"
    unread, routers = "experts of a layout lora-da cannot read", "routers"
    left_out: Dict[str, List[str]] = {"output heads": [], small: [], unread: [], routers: []}
    skip_under: List[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(prefix + ".") for prefix in skip_under):
            continue
        if _is_modules_to_save(module):
            left_out["output heads"].append(name)
            skip_under.append(name)
            continue
        if is_linear_like(module):
            if module is head:
                continue  # the LM head: documented, no warning
            parent_name = name.rpartition(".")[0]
            if "Router" in type(model.get_submodule(parent_name) if parent_name else model).__name__:
                left_out[routers].append(name)  # an nn.Linear router (SwitchTransformers' router.classifier)
            elif _is_head(name):
                left_out["output heads"].append(name)
            elif rank > min(linear_dims(module)):
                left_out[small].append(name)
            else:
                found[name] = module
            continue
        if looks_like_experts(module):
            parameters = fused_parameters(module)
            if parameters is None:
                left_out[unread].append(name)
                continue
            slices = expert_slices(name, module, parameters)
            too_small = [key for key, s in slices.items() if rank > min(s.in_features, s.out_features)]
            left_out[small].extend(too_small)
            found.update({key: s for key, s in slices.items() if key not in too_small})
            continue
        if _is_router(model, name, module):
            left_out[routers].append(name)
    return found, left_out


def _is_router(model: nn.Module, name: str, module: nn.Module) -> bool:
    """A non-linear module with a 2-D weight beside an experts module (an MoE block's router)."""
    weight = getattr(module, "weight", None)
    if isinstance(module, nn.Embedding) or getattr(weight, "dim", lambda: 0)() != 2:
        return False
    parent_name = name.rpartition(".")[0]
    parent = model.get_submodule(parent_name) if parent_name else model
    return any(looks_like_experts(child) for child in parent.children() if child is not module)


def _warn_left_out(left_out: Dict[str, List[str]]) -> None:
    parts = [f"{reason}: {_summarize(names)}" for reason, names in left_out.items() if names]
    if parts:
        warn_user(
            "lora-da: left out of the default targets (name them in target_modules to choose otherwise): "
            + "; ".join(parts),
            TargetsWarning,
        )


def _named_targets(model: nn.Module, target_modules: TargetModules, candidates) -> Dict[str, object]:
    """The modules (and experts) that ``target_modules`` names."""
    found: Dict[str, object] = {}
    for name, module in candidates:
        if looks_like_experts(module):
            parameters = fused_parameters(module)
            own = [n for n, p in module.named_parameters(recurse=False) if p.dim() == 3]
            whole = _matches(name, target_modules)
            if not whole and not any(_matches(f"{name}.{p}", target_modules) for p in own):
                continue
            if parameters is None:
                raise ValueError(
                    f"target module '{name}' is a {type(module).__name__}: an experts layout lora-da cannot read "
                    "(served: transformers' fused experts, gate_up_proj/up_proj and down_proj of shape (E, ., .))"
                )
            chosen = parameters if whole else tuple(p for p in parameters if _matches(f"{name}.{p}", target_modules))
            found.update(expert_slices(name, module, chosen))
        elif _matches(name, target_modules):
            if not is_linear_like(module):
                raise ValueError(
                    f"target module '{name}' is a {type(module).__name__}, not an nn.Linear; "
                    "LoRA-DA initializes nn.Linear (and GPT-2 Conv1D) modules and fused MoE experts only"
                )
            found[name] = module
    return found


def find_target_modules(model: nn.Module, target_modules: TargetModules, rank: int) -> Dict[str, object]:
    """Return ``{name: target}`` of the linear modules and experts to initialize.

    ``None`` selects every ``nn.Linear`` (and GPT-2 ``Conv1D``) and every expert of
    fused MoE experts (:mod:`lora_da.experts`) except: the LM head
    (``model.get_output_embeddings()``), the output heads of other tasks
    (anything under a module named ``classifier``, ``score`` or ``qa_outputs``,
    or a PEFT ``modules_to_save`` wrapper), and targets with ``min(d_in, d_out) < rank``
    (e.g. Qwen2-MoE's ``shared_expert_gate``). Those, and what cannot be served
    (MoE routers; experts of a layout lora-da cannot
    read), are listed in one :class:`~lora_da.user_warnings.TargetsWarning`.
    A list of names uses PEFT's suffix rule; a string is a full-match regular
    expression; an experts module (``mlp.experts``) or one of its fused
    parameters (``mlp.experts.gate_up_proj``) names its experts. On a model
    already wrapped by PEFT, the candidates are its LoRA layers (their base
    layers are hooked), named without the ``base_model.model.`` prefix.
    Raises ``ValueError`` when nothing matches, when a named module is neither
    an ``nn.Linear`` nor served experts, or when ``rank`` exceeds
    ``min(d_in, d_out)`` of a named target.
    """
    if target_modules is not None and not isinstance(target_modules, str):
        target_modules = list(target_modules)
        if not target_modules or not all(isinstance(t, str) for t in target_modules):
            raise ValueError(f"target_modules must be None, a regex string or a non-empty list of names, got {target_modules!r}")
    peft_layers = peft_base_layers(model)
    if peft_layers:  # a PEFT model: initialize its LoRA layers, hooking their base layers
        candidates = [(n, m) for n, m in peft_layers.items() if is_linear_like(m)]
        wrapped_experts = sorted({n for n, m in peft_layers.items() if not is_linear_like(m)})
        if wrapped_experts:
            warn_user(
                "lora-da: LoRA layers of PEFT target_parameters (experts) are not served on a model already "
                f"wrapped by PEFT: {_summarize(wrapped_experts)}; initialize the unwrapped model instead",
                TargetsWarning,
            )
        found = dict(candidates) if target_modules is None else _named_targets(model, target_modules, candidates)
    elif target_modules is None:
        found, left_out = _default_targets(model, rank)
        _warn_left_out(left_out)
    else:
        found = _named_targets(model, target_modules, [(n, m) for n, m in model.named_modules() if n])
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
