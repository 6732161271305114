"""The memory budget: how many layers' statistics one pass over the data holds,
and how much the solve may add to them.

The statistics of a target module are its gradient ``G`` (``d_out x d_in``),
its output factor ``y`` (``d_out``) and the input factor ``Z`` (``d_in x d_in``)
of its input group. Which modules share an input is only known once the model
has run, so the plan counts one ``Z`` per module: an upper bound (q/k/v and
gate/up share theirs). Modules are kept together by layer
(:func:`lora_da.naming.layer_prefix`, e.g. ``model.layers.3``), and consecutive
layers are packed into a pass while they fit the budget (docs/math.md §7).

``max_memory`` bounds the statistics *and* the solve's own working set (the
float64 preparation and the solver's workspace): the statistics of a pass get
the budget less :func:`solve_reserve` (the float64 working set of the largest
single module, so that the solve can always proceed module by module), and the
solve gets what the pass's statistics leave (:func:`solve_budget`). Without
``max_memory`` the budget is half the free memory and the solve's share is at
most the statistics' own bytes: the solve prepares as many modules at once as
that allows (the float64 copies of every module at once would be about twice the
statistics).
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Union

import torch
from torch import nn

from .layers import linear_dims
from .naming import layer_prefix

DEFAULT_FRACTION = 0.5  # of the free memory, when the user gives no budget


def free_memory(device: torch.device) -> int:
    """Bytes free on ``device`` (CUDA: ``mem_get_info``; CPU: ``MemAvailable``)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - exotic platforms
        return 2**63 - 1


def statistics_budget(max_memory: Union[None, int, float], device: torch.device) -> int:
    """``max_memory`` (bytes, a fraction of free memory, or ``None``) in bytes."""
    if isinstance(max_memory, int) and not isinstance(max_memory, bool):
        return max_memory
    fraction = DEFAULT_FRACTION if max_memory is None else float(max_memory)
    return int(fraction * free_memory(device))


def module_solve_bytes(module: nn.Module) -> int:
    """Upper bound of the float64 working set of solving one module alone: ``Z`` and the
    Cholesky factors of ``Z`` and of the preconditioner (``d_in x d_in`` each), ``Δ̂`` and a
    transient ``Gᵀ`` (``d_in x d_out`` each)."""
    d_in, d_out = linear_dims(module)
    return 8 * (3 * d_in * d_in + 2 * d_out * d_in)


def solve_reserve(modules: Dict[str, nn.Module]) -> int:
    """What the plan keeps back from ``max_memory`` for the solve: the largest
    :func:`module_solve_bytes` (0 without modules)."""
    return max((module_solve_bytes(m) for m in modules.values()), default=0)


def statistics_share(budget: int, modules: Dict[str, nn.Module]) -> int:
    """The statistics' part of ``budget`` (bytes): the budget less :func:`solve_reserve`.
    ``MemoryError`` naming the module when the budget cannot even hold its solve."""
    reserve = solve_reserve(modules)
    if reserve >= budget:
        name = max(modules, key=lambda n: module_solve_bytes(modules[n]))
        raise MemoryError(
            f"the solve of module '{name}' needs {format_bytes(reserve)} of float64 working memory, "
            f"the whole max_memory budget of {format_bytes(budget)}; raise max_memory"
        )
    return budget - reserve


def solve_budget(budget: int, statistics_bytes: int, reserve: int, given: bool) -> int:
    """Bytes the solve of a pass may add to its statistics (``SolveContext.solve_memory_budget``):
    what ``budget`` leaves after the pass's statistics (at least ``reserve``, which the plan
    kept back); when the budget was not ``given`` (the default fraction of free memory), at
    most the larger of the statistics' own bytes and ``reserve``."""
    left = max(budget - statistics_bytes, reserve)
    return left if given else min(left, max(statistics_bytes, reserve))


def module_statistics_bytes(module: nn.Module, element_size: int, input_factor_size: Optional[int] = None) -> int:
    """Upper bound of one module's statistics: G and y (``element_size`` bytes each entry) and a
    Z of its own (``input_factor_size``, default ``element_size``: Z may be float64 alone)."""
    d_in, d_out = linear_dims(module)
    z_size = element_size if input_factor_size is None else input_factor_size
    return (d_out * d_in + d_out) * element_size + d_in * d_in * z_size


def plan_passes(
    modules: Dict[str, nn.Module], budget: int, element_size: int, input_factor_size: Optional[int] = None
) -> List[Dict[str, nn.Module]]:
    """Split ``modules`` (in order) into passes whose statistics fit ``budget`` bytes.

    Whole layers go together; a layer that alone exceeds the budget is split
    module by module. Raises ``MemoryError`` naming a module that alone does not fit.
    """
    layers: Dict[str, Dict[str, nn.Module]] = {}
    for name, module in modules.items():
        layers.setdefault(layer_prefix(name), {})[name] = module

    passes: List[Dict[str, nn.Module]] = []
    current: Dict[str, nn.Module] = {}
    used = 0

    def add(units: Dict[str, nn.Module], size: int) -> None:
        nonlocal current, used
        if current and used + size > budget:
            passes.append(current)
            current, used = {}, 0
        current.update(units)
        used += size

    for layer_modules in layers.values():
        sizes = {name: module_statistics_bytes(m, element_size, input_factor_size) for name, m in layer_modules.items()}
        if sum(sizes.values()) <= budget:
            add(layer_modules, sum(sizes.values()))
            continue
        for name, module in layer_modules.items():
            if sizes[name] > budget:
                raise MemoryError(
                    f"the statistics of module '{name}' need {format_bytes(sizes[name])}, more than the "
                    f"max_memory budget of {format_bytes(budget)}; raise max_memory"
                )
            add({name: module}, sizes[name])
    if current:
        passes.append(current)
    return passes


def format_bytes(count: int) -> str:
    """``1536`` → ``'1.5 KiB'``."""
    value = float(count)
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{int(value)} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"  # pragma: no cover


def is_reiterable(loader: object) -> bool:
    """False for one-shot iterators (generators), which a second pass would find empty."""
    try:
        return iter(loader) is not loader
    except TypeError:
        return False


__all__ = [
    "free_memory",
    "statistics_budget",
    "plan_passes",
    "module_statistics_bytes",
    "module_solve_bytes",
    "solve_reserve",
    "statistics_share",
    "solve_budget",
    "is_reiterable",
]
