"""Writing LoRA factors into PEFT models and PEFT adapter directories.

Every file written here (``adapter_config.json``, ``adapter_model.safetensors``,
``lora_da_init.json``) is written atomically (a temporary file in the same
directory, fsync'ed, renamed over the name) with the mode a plain ``open`` would
give, ``0666 & ~umask``; ``adapter_config.json`` is byte-identical across runs
(sets, such as PEFT's ``target_modules``, are written as sorted lists).
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from typing import TYPE_CHECKING, Any, Dict, Optional

import torch
from torch import nn

from . import expert_peft
from .atomic_files import write_atomically
from .layers import is_conv1d, peft_lora_layers, stores_transposed_weight

if TYPE_CHECKING:  # pragma: no cover - annotations only: result imports this module
    from .result import LoraInit


def _find_layer(layers: Dict[str, nn.Module], name: str) -> nn.Module:
    matches = [full for full in layers if full == name or full.endswith("." + name)]
    if len(matches) != 1:
        what = "no" if not matches else f"{len(matches)} ({matches})"
        raise ValueError(f"module '{name}' of this LoraInit has {what} matching PEFT LoRA layers")
    return layers[matches[0]]


def _experts_of(init: "LoraInit") -> set:
    """The names of ``init``'s targets that are experts of fused parameters."""
    return set(getattr(init, "experts", {}) or {})


def factors_for_scaling(init: "LoraInit", name: str, scaling: float):
    """``(lora_A, lora_B)`` of module ``name`` as written into a layer of scaling ``s``:
    divided by ``√s`` when the init's factors are for ``s = 1`` (:attr:`LoraInit.unit_scaling_factors`)."""
    module_init = init.modules[name]
    if not init.unit_scaling_factors:
        return module_init.lora_A, module_init.lora_B
    root = math.sqrt(scaling)
    return module_init.lora_A / root, module_init.lora_B / root


def peft_scaling(lora_alpha: Optional[float], rank: int, use_rslora: bool) -> float:
    """PEFT's scaling ``s`` for a layer of rank ``rank`` (``lora_alpha`` ``None``: PEFT's default)."""
    if lora_alpha is None:
        lora_alpha = _require_peft().LoraConfig().lora_alpha
    return float(lora_alpha) / (math.sqrt(rank) if use_rslora else rank)


def rank_pattern(init: "LoraInit") -> Dict[str, int]:
    """PEFT ``rank_pattern`` for modules whose rank differs from :attr:`LoraInit.max_rank`
    (keys are escaped full names: PEFT reads them as regular expressions)."""
    top = init.max_rank
    return {re.escape(name): rank for name, rank in init.ranks.items() if rank != top}


def _offset_base_weight(name: str, layer: nn.Module, adapter_name: str) -> None:
    """``W ← W − s·B·A`` from the layer's own (cast) factors."""
    base = layer.get_base_layer().weight
    if not base.is_floating_point():
        raise TypeError(
            f"module '{name}': the base weight is {base.dtype}; this init changes W (W - s*B*A) "
            "and needs a floating-point base weight"
        )
    a_param = layer.lora_A[adapter_name].weight
    b_param = layer.lora_B[adapter_name].weight
    scaling = float(layer.scaling[adapter_name])
    # The adapted layer will add s·B·A computed from the stored (cast) factors.
    delta = scaling * (b_param.to(torch.float32) @ a_param.to(torch.float32))
    if stores_transposed_weight(layer):  # GPT-2 Conv1D stores W as d_in x d_out
        delta = delta.T
    with torch.no_grad():
        base.copy_((base.to(torch.float32) - delta.to(base.device)).to(base.dtype))


def apply_to_peft_model(init: "LoraInit", peft_model: nn.Module, adapter_name: str = "default") -> None:
    """Copy ``init``'s factors into ``peft_model``'s LoRA layers (see :meth:`LoraInit.apply`)."""
    layers = peft_lora_layers(peft_model, adapter_name)
    if not layers:
        raise ValueError(f"the model has no PEFT LoRA layer with adapter '{adapter_name}'")
    plan = []
    experts = _experts_of(init)
    expert_layers = expert_peft.apply_experts(
        init, peft_model, adapter_name, lambda n, s: factors_for_scaling(init, n, s), init.modifies_base_weight
    ) if experts else []
    for name, module_init in init.modules.items():
        if name in experts:
            continue
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
        if init.modifies_base_weight and not layer.get_base_layer().weight.is_floating_point():
            raise TypeError(
                f"module '{name}': the base weight is {layer.get_base_layer().weight.dtype}; this init changes W "
                "(W - s*B*A) and needs a floating-point base weight"
            )
        plan.append((name, layer, a_param, b_param, module_init))
    covered = {id(layer) for _, layer, *_ in plan} | {id(layer) for layer in expert_layers}
    uncovered = [full for full, layer in layers.items() if id(layer) not in covered]
    if uncovered:
        warnings.warn(
            f"{len(uncovered)} LoRA layers of adapter '{adapter_name}' are not covered by this LoraInit "
            f"and keep PEFT's default init (e.g. '{uncovered[0]}')",
            stacklevel=3,
        )
    with torch.no_grad():
        for name, layer, a_param, b_param, module_init in plan:
            lora_A, lora_B = factors_for_scaling(init, name, float(layer.scaling[adapter_name]))
            a_param.copy_(lora_A.to(device=a_param.device, dtype=a_param.dtype))
            b_param.copy_(lora_B.to(device=b_param.device, dtype=b_param.dtype))
            if init.modifies_base_weight:
                _offset_base_weight(name, layer, adapter_name)


ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_CONFIG_NAME = "adapter_config.json"  # PEFT's CONFIG_NAME
INIT_REPORT_NAME = "lora_da_init.json"


def _write_text(path: str, text: str) -> None:
    def write(temporary: str) -> None:
        with open(temporary, "w", encoding="utf-8") as f:
            f.write(text)

    write_atomically(path, write)


def _write_tensors(path: str, tensors: Dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    write_atomically(path, lambda temporary: save_file(tensors, temporary, metadata={"format": "pt"}))


def _json_value(value: Any) -> Any:
    """Sets (PEFT keeps ``target_modules`` as one) as sorted lists: the same bytes on every run."""
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=lambda item: (type(item).__name__, str(item)))
    return value


def adapter_config_json(config: Any) -> str:
    """``adapter_config.json`` as PEFT's ``LoraConfig.save_pretrained`` writes it (its
    ``to_dict``, ``indent=2``, ``sort_keys=True``), except that sets are written sorted
    (PEFT writes them in hash order, which changes with ``PYTHONHASHSEED``)."""
    return json.dumps({key: _json_value(value) for key, value in config.to_dict().items()}, indent=2, sort_keys=True)


def _prepare_directory(save_directory: str) -> str:
    save_directory = os.fspath(save_directory)
    if os.path.exists(save_directory) and not os.path.isdir(save_directory):
        raise ValueError(f"save_directory '{save_directory}' exists and is not a directory")
    os.makedirs(save_directory, exist_ok=True)
    return save_directory


def _write_adapter(save_directory: str, config: Any, tensors: Dict[str, torch.Tensor]) -> None:
    """The weights first (the large write, the likeliest to fail: then nothing was changed), then the config."""
    _write_tensors(os.path.join(save_directory, ADAPTER_WEIGHTS_NAME), tensors)
    _write_text(os.path.join(save_directory, ADAPTER_CONFIG_NAME), adapter_config_json(config))


def init_fan_in_fan_out(init: "LoraInit") -> bool:
    """PEFT's ``fan_in_fan_out`` for ``init``'s targets: True when every one stores its weight
    ``d_in x d_out`` (GPT-2 ``Conv1D``), as recorded in ``ModuleInit.transposed_weight``
    (False where the init does not record it). PEFT corrects a wrong value per layer, with a warning."""
    flags = [bool(getattr(m, "transposed_weight", False)) for m in init.modules.values()]
    return bool(flags) and all(flags)


def save_adapter(
    init: "LoraInit",
    save_directory: str,
    *,
    lora_alpha: Optional[float] = None,
    use_rslora: bool = False,
    base_model_name_or_path: Optional[str] = None,
    task_type: Optional[str] = None,
    fan_in_fan_out: Optional[bool] = None,
    model: Optional[nn.Module] = None,
) -> None:
    """Write a PEFT adapter directory (see :meth:`LoraInit.save_pretrained`).

    For the task types whose PEFT model trains the output head in full
    (``SEQ_CLS``, ``TOKEN_CLS``: ``classifier``/``score``; ``QUESTION_ANS``: ``qa_outputs``)
    the head's weights are saved too, read from ``model`` (required then), as PEFT's
    ``modules_to_save`` are.

    ``task_type`` (e.g. ``"CAUSAL_LM"``) is recorded in ``adapter_config.json``, so that
    ``PeftModel.from_pretrained`` makes the task's PEFT model class. ``fan_in_fan_out``
    (``None``: from the init, see :func:`init_fan_in_fan_out`) is True for GPT-2 style
    ``Conv1D`` targets. ``target_modules`` are the init's full module names, sorted.
    Files are written atomically with the umask's mode (see the module doc).
    """
    peft = _require_peft()
    experts = _experts_of(init)
    config_kwargs = dict(
        r=init.max_rank,
        rank_pattern=rank_pattern(init),
        target_modules=sorted(n for n in init.modules if n not in experts),
        **_expert_config(init),
        use_rslora=use_rslora,
        base_model_name_or_path=base_model_name_or_path,
        init_lora_weights=True,
        task_type=task_type,
        fan_in_fan_out=init_fan_in_fan_out(init) if fan_in_fan_out is None else bool(fan_in_fan_out),
    )
    if lora_alpha is not None:
        config_kwargs["lora_alpha"] = lora_alpha
    config = peft.LoraConfig(**config_kwargs)  # PEFT's own checks (e.g. task_type) before anything is written
    tensors = expert_peft.adapter_tensors(
        init, lambda rank: peft_scaling(config.lora_alpha, rank, use_rslora), lambda n, s: factors_for_scaling(init, n, s)
    )
    for name, module_init in init.modules.items():
        if name in experts:
            continue
        scaling = peft_scaling(config.lora_alpha, module_init.rank, use_rslora)
        lora_A, lora_B = factors_for_scaling(init, name, scaling)
        tensors[f"base_model.model.{name}.lora_A.weight"] = lora_A.detach().to("cpu").contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = lora_B.detach().to("cpu").contiguous()
    tensors.update(_head_tensors(model, task_type))
    report = json.dumps(init.report(), indent=2)
    save_directory = _prepare_directory(save_directory)
    _write_adapter(save_directory, config, tensors)
    _write_text(os.path.join(save_directory, INIT_REPORT_NAME), report)


#: The heads PEFT's model class of a task type wraps as ``modules_to_save`` (saved in full).
TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"), "QUESTION_ANS": ("qa_outputs",)}


def _head_tensors(model: Optional[nn.Module], task_type: Optional[str]) -> Dict[str, torch.Tensor]:
    """The weights of the task's heads in ``model``, keyed as PEFT saves ``modules_to_save``."""
    heads = TASK_HEADS.get(str(task_type), ())
    if not heads:
        return {}
    if model is None:
        raise ValueError(
            f"task_type={task_type!r}: PEFT trains the head ({'/'.join(heads)}) in full and loads it from the "
            "adapter, so save_pretrained needs the base model: pass model="
        )
    tensors = {}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in heads:
            for key, value in module.state_dict().items():
                tensors[f"base_model.model.{name}.{key}"] = value.detach().to("cpu").contiguous()
    if not tensors:
        raise ValueError(f"task_type={task_type!r}: the model has no head named {' or '.join(heads)}")
    return tensors


def _expert_config(init: "LoraInit") -> Dict[str, Any]:
    """``LoraConfig`` options for the experts: ``target_parameters`` (none: empty)."""
    keys = expert_peft.parameter_keys(init) if _experts_of(init) else []
    return {"target_parameters": keys} if keys else {}


def _require_peft():
    try:
        import peft
    except ImportError as error:  # pragma: no cover
        raise ImportError("this needs peft: pip install 'lora-da[hf]'") from error
    return peft


def load_init_adapter(base_model: nn.Module, save_directory: str, *, adapter_name: str = "default", **kwargs):
    """Load a directory written by :meth:`LoraInit.save_pretrained` onto the
    unmodified ``base_model``, ready to train.

    ``PeftModel.from_pretrained(base_model, save_directory, is_trainable=True, **kwargs)``;
    when the init changes the base weight (``lora_da_init.json`` says
    ``"base_weight": "offset: ..."``: pissa, milora, lora-ga, ``preserve_output``)
    every target base weight then becomes ``W − s·B·A`` from the loaded factors, so
    the model is exactly the one :meth:`LoraInit.apply` gives. ``base_model`` is
    modified in place.
    """
    peft = _require_peft()
    kwargs.setdefault("is_trainable", True)
    peft_model = peft.PeftModel.from_pretrained(base_model, save_directory, adapter_name=adapter_name, **kwargs)
    report_path = os.path.join(save_directory, INIT_REPORT_NAME)
    with open(report_path) as f:
        report = json.load(f)
    if str(report.get("base_weight", "unchanged")).startswith("offset"):
        layers = peft_lora_layers(peft_model, adapter_name)
        experts = set(report.get("experts", {}))
        for name in report["modules"]:
            if name not in experts:
                _offset_base_weight(name, _find_layer(layers, name), adapter_name)
        expert_peft.offset_loaded_experts(peft_model, report, adapter_name)
    return peft_model


def get_peft_model_with_init(
    model: nn.Module,
    init: "LoraInit",
    *,
    lora_alpha: Optional[float] = None,
    adapter_name: str = "default",
    **lora_config_kwargs,
):
    """Wrap ``model`` in a PEFT LoRA model whose adapter starts at ``init``.

    One call for ``get_peft_model(model, LoraConfig(r=init.config.rank,
    target_modules=<init's modules>, lora_alpha=..., **lora_config_kwargs))``
    followed by ``init.apply(peft_model)``. ``lora_alpha`` (PEFT's default
    when ``None``) and e.g. ``use_rslora``, ``lora_dropout`` go to the
    ``LoraConfig``; ``r`` and ``target_modules`` come from ``init``. ``task_type``
    (e.g. ``"CAUSAL_LM"``) goes to the ``LoraConfig`` too, so ``get_peft_model``
    makes the task's PEFT model class. ``fan_in_fan_out`` defaults to True when
    every target of ``init`` in ``model`` is a GPT-2 style ``Conv1D``.

    With ``preserve_output=True`` the base weights of ``model`` are modified in
    place (``W − s·B₀A₀``). Do not ship them: after training, save with
    :func:`save_as_plain_lora`, which writes an adapter for the *unmodified*
    base. (``peft_model.save_pretrained`` would write an adapter that is only
    right on the modified base.)
    """
    peft = _require_peft()
    for key in ("r", "target_modules", "rank_pattern", "target_parameters"):
        if key in lora_config_kwargs:
            raise ValueError(f"'{key}' comes from the LoraInit; do not pass it")
    if lora_alpha is not None:
        lora_config_kwargs["lora_alpha"] = lora_alpha
    if "fan_in_fan_out" not in lora_config_kwargs:
        lora_config_kwargs["fan_in_fan_out"] = _targets_are_conv1d(model, init)
    experts = _experts_of(init)
    config = peft.LoraConfig(
        r=init.max_rank,
        rank_pattern=rank_pattern(init),
        target_modules=sorted(n for n in init.modules if n not in experts),
        **_expert_config(init),
        **lora_config_kwargs,
    )
    peft_model = peft.get_peft_model(model, config, adapter_name=adapter_name)
    init.apply(peft_model, adapter_name=adapter_name)
    return peft_model


def _targets_are_conv1d(model: nn.Module, init: "LoraInit") -> bool:
    """Every module of ``init`` is, in ``model``, a GPT-2 style ``Conv1D`` (PEFT's ``fan_in_fan_out``)."""
    found = []
    for name in init.modules:
        try:
            found.append(is_conv1d(model.get_submodule(name)))
        except AttributeError:  # named otherwise in this model: PEFT's suffix match decides
            return False
    return bool(found) and all(found)


def plain_lora_state(
    peft_model: nn.Module, init: "LoraInit", adapter_name: str = "default"
) -> Dict[str, torch.Tensor]:
    """Rank-2r factors of ``ΔW = s(B'A' − B₀A₀) = s[B' | −B₀][A' ; A₀]`` for every module of ``init``.

    ``A'``/``B'`` are the adapter's current (trained) factors, ``A₀``/``B₀`` the
    init's, cast to the adapter's dtype as :meth:`LoraInit.apply` did when it
    subtracted ``s·B₀A₀`` from the base. Keys as in a PEFT adapter file.
    """
    if _experts_of(init):
        raise ValueError("save_as_plain_lora does not support MoE expert targets (target_parameters) yet")
    layers = peft_lora_layers(peft_model, adapter_name)
    tensors = {}
    for name in init.modules:
        layer = _find_layer(layers, name)
        a_param = layer.lora_A[adapter_name].weight.detach()
        b_param = layer.lora_B[adapter_name].weight.detach()
        init_A, init_B = factors_for_scaling(init, name, float(layer.scaling[adapter_name]))
        a0 = init_A.to(dtype=a_param.dtype).to("cpu", torch.float32)
        b0 = init_B.to(dtype=b_param.dtype).to("cpu", torch.float32)
        a_cat = torch.cat([a_param.to("cpu", torch.float32), a0], dim=0)
        b_cat = torch.cat([b_param.to("cpu", torch.float32), -b0], dim=1)
        tensors[f"base_model.model.{name}.lora_A.weight"] = a_cat.to(a_param.dtype).contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b_cat.to(b_param.dtype).contiguous()
    return tensors


def save_as_plain_lora(
    peft_model: nn.Module,
    init: "LoraInit",
    save_directory: str,
    *,
    adapter_name: str = "default",
    base_model_name_or_path: Optional[str] = None,
) -> None:
    """Save a (trained) PEFT model made with a ``preserve_output=True`` init as a
    plain LoRA adapter for the **unmodified** base model.

    The PEFT model's base is ``W − s·B₀A₀``; its adapter adds ``s·B'A'``. On the
    original ``W`` the same function is ``W + s(B'A' − B₀A₀)``, a rank-``2r``
    LoRA adapter ``[A'; A₀]``, ``[B' | −B₀]`` with the same scaling ``s``
    (``lora_alpha`` doubled, or multiplied by √2 with rsLoRA, since ``r``
    doubles). This is what PEFT does for PiSSA/OLoRA
    (``path_initial_model_for_weight_conversion``). The directory loads with
    ``PeftModel.from_pretrained(original_base, save_directory)``.
    """
    peft = _require_peft()
    if not init.modifies_base_weight:
        raise ValueError(
            "this LoraInit does not change the base weight (preserve_output=False, method "
            f"{init.method!r}): the base weights were not modified, "
            "save the PEFT model with peft_model.save_pretrained(dir) as usual"
        )
    source = peft_model.peft_config[adapter_name]
    if source.rank_pattern or source.alpha_pattern:
        raise ValueError("adapters with rank_pattern/alpha_pattern are not supported by save_as_plain_lora")
    if source.bias != "none" or getattr(source, "modules_to_save", None):
        raise ValueError("save_as_plain_lora saves LoRA factors only: use bias='none' and no modules_to_save")
    rank = int(source.r)
    lora_alpha = float(source.lora_alpha) * (2**0.5 if source.use_rslora else 2.0)
    if base_model_name_or_path is None:
        base_model_name_or_path = source.base_model_name_or_path
    config = peft.LoraConfig(
        r=2 * rank,
        lora_alpha=lora_alpha,
        use_rslora=source.use_rslora,
        target_modules=sorted(init.modules),
        base_model_name_or_path=base_model_name_or_path,
        init_lora_weights=True,
        task_type=source.task_type,
        fan_in_fan_out=source.fan_in_fan_out,
    )
    tensors = plain_lora_state(peft_model, init, adapter_name)
    _write_adapter(_prepare_directory(save_directory), config, tensors)
