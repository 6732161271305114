"""What a method is: the contract between one method's file and the shared driver.

A method file under ``lora_da/methods/`` defines ``METHOD = register(Method(...))``:
its name, which statistics it needs, what it does to the base weight, its
options as a frozen dataclass, and a ``solve`` function; ``methods/__init__.py``
imports each file once, which registers it in :data:`METHODS`. The driver
(:mod:`lora_da.pipeline`) finds the targets, plans and runs the statistics
passes, all-reduces them under ``torch.distributed``, and calls ``solve`` with a
:class:`SolveContext` once per pass; ``solve`` returns a :class:`Solution`.
Nothing here imports the driver or the config: a method depends only on the
statistics, the layers and the linear algebra below it.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Protocol

from torch import nn

from ..layers import require_float_weight
from ..module_init import ModuleInit, make_module_init
from ..statistics import KFACStatistics

# What a method reads from the data (Method.statistics).
NO_STATISTICS = "none"  # no loader: the method reads only the model (or nothing)
FORWARD_STATISTICS = "forward"  # Z only: forward passes, no backward
FULL_STATISTICS = "full"  # G, Z and y: one hooked forward+backward per batch


class Settings(Protocol):
    """The options a method reads (:class:`lora_da.LoraDAConfig` provides them)."""

    rank: int
    alpha: float
    beta: float
    gamma: float
    damping: float
    seed: int
    solver: str
    progress: bool


@dataclass(frozen=True)
class NoOptions:
    """A method without options of its own."""


@dataclass
class SolveContext:
    """Everything one pass gives a method's ``solve``.

    ``targets`` are the pass's target modules in model order; ``names`` the ones
    to solve in this process (all of them, or under ``torch.distributed`` this
    rank's share when the method splits solves). ``statistics`` is ``None`` for
    methods that need none. ``solve`` may add seconds to ``timings["factor_prep"]``;
    the driver books the rest of its time as ``"solve"``. ``solve_memory_budget``:
    the bytes the solve's own working set (float64 preparation and solver
    workspace, beyond the statistics) may take at once, or ``None`` for no limit;
    the driver sets it from ``max_memory`` (:func:`lora_da.memory.solve_budget`);
    methods that work in groups of modules size the groups by it.
    """

    settings: Settings
    options: Any
    targets: Dict[str, nn.Module]
    names: List[str]
    statistics: Optional[KFACStatistics]
    train_size: int
    timings: Dict[str, float]
    solve_memory_budget: Optional[int] = None

    def input_group(self, name: str) -> tuple:
        """The modules sharing ``name``'s input tensor (``(name,)`` without statistics)."""
        if self.statistics is None:
            return (name,)
        stats = self.statistics
        return stats.groups[stats.modules[name].group_index].members


class Solution(NamedTuple):
    """What ``solve`` returns: the module inits (in ``names`` order) and the solver's name."""

    modules: Dict[str, ModuleInit]
    backend: str


def solve_each(context: SolveContext, label: str, factors: Callable[[str], tuple]) -> Solution:
    """A solve that treats each module on its own: ``factors(name)`` returns
    ``(lora_A, lora_B, values, sigma)`` (values: the method's singular values), in
    ``context.names`` order; the backend is reported as ``"<label> (torch.linalg, float64)"``."""
    result = {}
    for name in context.names:
        lora_A, lora_B, values, sigma = factors(name)
        result[name] = make_module_init(
            name, lora_A, lora_B, values, sigma, input_group=context.input_group(name)
        )
    return Solution(result, f"{label} (torch.linalg, float64)")


class PhaseClock:
    """Adds the seconds since the last lap to ``timings[phase]``."""

    def __init__(self, timings: Dict[str, float]) -> None:
        self.timings = timings
        self.last = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.timings[phase] = self.timings.get(phase, 0.0) + now - self.last
        self.last = now


@dataclass(frozen=True)
class Method:
    """One initialization method: its metadata and its solve.

    Attributes:
        name: the ``method=`` string.
        solve: ``solve(context) -> Solution`` for one pass.
        statistics: ``NO_STATISTICS``, ``FORWARD_STATISTICS`` or ``FULL_STATISTICS``.
        options: a frozen dataclass of numbers with defaults (``method_options``).
        reads_weight: reads ``W`` (a module whose weight is not floating point is refused).
        offsets_base_weight: ``apply`` replaces ``W`` by ``W − s·B·A``.
        unit_scaling: factors are stored for ``s = 1`` and divided by ``√s`` on apply.
        uses_train_size: the result depends on ``train_size`` (a warning when it is not given).
        splits_solves: under ``torch.distributed`` each module is solved on one rank and
            the factors gathered (otherwise every rank solves every module).
        check: ``check(targets, rank, options)`` before any pass: raises on targets the
            method cannot serve.
    """

    name: str
    solve: Callable[[SolveContext], Solution]
    statistics: str = FULL_STATISTICS
    options: type = NoOptions
    reads_weight: bool = False
    offsets_base_weight: bool = False
    unit_scaling: bool = False
    uses_train_size: bool = False
    splits_solves: bool = False
    check: Optional[Callable[[Dict[str, nn.Module], int, Any], None]] = None

    @property
    def needs_data(self) -> bool:
        return self.statistics != NO_STATISTICS

    def resolve_options(self, given: Optional[Mapping[str, float]]) -> Any:
        """``given`` merged into the defaults, as an instance of :attr:`options` (``ValueError`` when invalid)."""
        known = [f.name for f in dataclasses.fields(self.options)]
        values: Dict[str, float] = {}
        for key, value in dict(given or {}).items():
            if key not in known:
                raise ValueError(
                    f"method {self.name!r} has no option {key!r} (its options: {', '.join(known) or 'none'})"
                )
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"method option {key!r} must be a finite number, got {value!r}")
            values[key] = float(value)
        return self.options(**values)

    def check_targets(self, targets: Dict[str, nn.Module], rank: int, options: Any) -> None:
        """Refuse, before any pass, the targets this method cannot serve."""
        if self.reads_weight:
            for name, module in targets.items():
                try:
                    require_float_weight(name, module)
                except TypeError as error:
                    others = ", ".join(m.name for m in METHODS.values() if not m.reads_weight)
                    raise TypeError(f"{error}; methods that read no weight: {others}") from None
        if self.check is not None:
            self.check(targets, rank, options)


#: Every registered method by name, in registration (import) order.
METHODS: Dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` to :data:`METHODS` (each name once) and return it."""
    if method.name in METHODS:
        raise ValueError(f"a method named {method.name!r} is already registered")
    if not (dataclasses.is_dataclass(method.options) and method.options.__dataclass_params__.frozen):
        raise TypeError(f"method {method.name!r}: options must be a frozen dataclass, got {method.options!r}")
    METHODS[method.name] = method
    return method
