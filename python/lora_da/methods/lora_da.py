"""``lora-da``: the Initialization Guidance Matrix's r smallest eigenvectors (docs/math.md §3).

Per module, from ``G``, ``Z`` and ``y``: ``Δ``, ``σ``, ``Δ̂``, ``c`` (steps 1-3),
``Ω = −αΔ̂Δ̂ᵀ + βcZ⁻¹`` (step 4), its ``r`` smallest eigenvectors ``A₀`` (step 5),
``B₀ = A₀ᵀΔ̂`` (step 6), and the factors scaled by ``1/√γ`` (step 7).

Two solvers share the reference's steps 5-7 (:func:`lora_da_reference.finish_module`):

* ``solver="auto"`` (:func:`solve_batched`): the preparation batched over
  same-shape modules (:mod:`lora_da_batched`), then the compiled batched LOBPCG
  on the operator form of Ω, preconditioned, one call per shape and module kind;
  every answer is checked independently in float64 and any that fails is solved
  again densely, with a warning (docs/math.md §5.3, §5.4).
* ``solver="eigh"`` (:func:`solve_dense`): the reference functions module by
  module and a dense float64 ``torch.linalg.eigh`` of the formed Ω — the oracle.

The files: this one (the solves and the registry entry),
``lora_da_reference.py`` (per-module float64 math), ``lora_da_batched.py``
(the batched preparation).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from tqdm.auto import tqdm

from ..module_init import ModuleInit
from ..solvers import EIGH_BACKEND, LoraDAOperator, failed_eigenpairs, lobpcg
from ..statistics import KFACStatistics
from ..user_warnings import warn_user
from . import lora_da_batched as batched
from .base import FULL_STATISTICS, Method, NoOptions, PhaseClock, Settings, Solution, SolveContext, register
from .lora_da_reference import (
    DampingEscalation,
    InputFactor,
    PreparedModule,
    damping_escalations,
    dense_eigenpairs,
    finish_module,
    prepare_input_factor,
    prepare_module,
    report_damping_escalations,
)


def _first_members(context: SolveContext) -> Dict[int, str]:
    """One module per input group (in order): Z is prepared once per group."""
    stats = context.statistics
    first: Dict[int, str] = {}
    for name in context.names:
        first.setdefault(stats.modules[name].group_index, name)
    return first


def _report_escalations(context: SolveContext, by_group: Dict[int, InputFactor]) -> None:
    """The pass's damping escalations, in one warning (or kept for the driver's
    :class:`~lora_da.methods.lora_da_reference.one_damping_summary`)."""
    stats = context.statistics
    members = {group: stats.groups[group].members for group in by_group}
    escalations = damping_escalations(by_group, members, context.settings.damping, stats.group_tokens())
    report_damping_escalations(escalations)


def _finisher(context: SolveContext, prepared: Dict[str, PreparedModule], factors: Dict[str, InputFactor]):
    """``finish(name, eigenvalues, vectors) -> ModuleInit`` (steps 5-7), advancing a progress bar."""
    settings = context.settings
    bar = tqdm(total=len(context.names), desc="lora-da solves", unit="module", disable=not settings.progress, leave=False)

    def finish(name: str, eigenvalues: torch.Tensor, vectors: torch.Tensor) -> ModuleInit:
        bar.update(1)
        return finish_module(
            name,
            prepared[name],
            eigenvalues,
            vectors,
            gamma=settings.gamma,
            damping=factors[name].damping,
            input_group=context.input_group(name),
        )

    return finish, bar


def solve_dense(context: SolveContext) -> Solution:
    """The oracle: the reference functions per module, Ω formed, ``torch.linalg.eigh`` in float64."""
    stats, settings = context.statistics, context.settings
    clock = PhaseClock(context.timings)
    by_group = {
        group: prepare_input_factor(stats.input_factor(name), settings.damping, name)
        for group, name in _first_members(context).items()
    }
    factors = {name: by_group[stats.modules[name].group_index] for name in context.names}
    prepared = {
        name: prepare_module(
            name,
            stats.gradient(name),
            factors[name],
            stats.output_factor_diag(name),
            damping=settings.damping,
            train_size=context.train_size,
        )
        for name in context.names
    }
    clock.lap("factor_prep")
    finish, bar = _finisher(context, prepared, factors)
    result = {}
    for name in context.names:
        eigenvalues, vectors = dense_eigenpairs(
            prepared[name], factors[name], rank=settings.rank, alpha=settings.alpha, beta=settings.beta
        )
        result[name] = finish(name, eigenvalues, vectors)
    bar.close()
    clock.lap("solve")
    _report_escalations(context, by_group)
    return Solution(result, EIGH_BACKEND)


def _preconditioners(
    context: SolveContext, prepared: Dict[str, PreparedModule], by_group: Dict[int, InputFactor]
) -> Tuple[Dict[int, torch.Tensor], Dict[int, float]]:
    """Per input group, the Cholesky factor of ``M = βcI + αZ`` and its shift βc
    (docs/math.md §5.3): the members differ only in βc, for which the geometric
    mean is used (P need not be exact). None without the bias term (α = 0)."""
    settings, stats = context.settings, context.statistics
    if not settings.alpha > 0:
        return {}, {}
    shifts: Dict[int, float] = {}
    for group in by_group:
        members = [m for m in context.names if stats.modules[m].group_index == group]
        scales = torch.tensor([settings.beta * prepared[m].variance_scale for m in members], dtype=torch.float64)
        shifts[group] = float(scales.clamp(min=1e-300).log().mean().exp()) if settings.beta > 0 else 0.0
    factors = batched.guidance_preconditioners(by_group, shifts, settings.alpha, overwrite_matrices=True)
    return factors, shifts


def working_set_bytes(context: SolveContext, groups: Sequence[int]) -> int:
    """An upper bound of the float64 bytes :func:`solve_batched` holds at once for the
    input ``groups`` and their members: per group Z, its Cholesky factor and the
    preconditioner's (3 d_in² float64), per member ``Gᵀ`` and Δ̂ (float64) and Δ̂'s
    float32 copy for the subspace iteration."""
    stats = context.statistics
    wanted = set(context.names)
    total = 0
    for group in groups:
        d_in = stats.groups[group].input_factor_sum.shape[-1]
        total += 3 * d_in * d_in * 8
        for name in stats.groups[group].members:
            if name in wanted:
                total += stats.modules[name].grad_sum.numel() * (8 + 8 + 4)
    return total


def solve_units(context: SolveContext) -> List[List[str]]:
    """``context.names`` split into units that :func:`solve_batched` prepares and solves
    one after the other, each freed before the next: modules joined by a solver batch
    (same shape and kind) or by a shared input group stay together (one Cholesky of Z
    per group, one LOBPCG call per batch); a unit whose working set
    (:func:`working_set_bytes`) exceeds ``context.solve_memory_budget`` is cut into
    runs of consecutive input groups that fit (at least one group each)."""
    stats = context.statistics
    group_of = {name: stats.modules[name].group_index for name in context.names}
    component: Dict[int, int] = {}  # input group -> unit id (union of batches sharing groups)
    batches = batched.solve_batches({name: tuple(stats.modules[name].grad_sum.shape) for name in context.names})
    for index, batch in enumerate(batches):
        joined = {component[group_of[n]] for n in batch if group_of[n] in component} | {index}
        target = min(joined)
        for group, unit in list(component.items()):
            if unit in joined:
                component[group] = target
        for name in batch:
            component[group_of[name]] = target
    units: Dict[int, List[int]] = {}
    for name in context.names:  # groups in model order within each unit
        groups = units.setdefault(component[group_of[name]], [])
        if group_of[name] not in groups:
            groups.append(group_of[name])
    budget = context.solve_memory_budget
    chunks: List[List[int]] = []
    for groups in units.values():
        if budget is None:
            chunks.append(groups)
            continue
        current: List[int] = []
        for group in groups:
            if current and working_set_bytes(context, current + [group]) > budget:
                chunks.append(current)
                current = []
            current.append(group)
        chunks.append(current)
    return [[name for name in context.names if group_of[name] in set(chunk)] for chunk in chunks]


def solve_batched(context: SolveContext) -> Solution:
    """The fast path, one unit of :func:`solve_units` at a time (its float64 copies freed
    before the next): batched float64 preparation, then one preconditioned LOBPCG call
    per batch of :func:`lora_da_batched.solve_batches`; failed answers solved again densely."""
    clock = PhaseClock(context.timings)
    bar = tqdm(total=len(context.names), desc="lora-da solves", unit="module", disable=not context.settings.progress, leave=False)
    result: Dict[str, ModuleInit] = {}
    backends: set = set()
    redone: List[str] = []
    escalations: List[DampingEscalation] = []
    for names in solve_units(context):
        _solve_unit(context, names, clock, bar, result, backends, redone, escalations)
    bar.close()
    backend = ", ".join(sorted(backends))
    if redone:
        warn_user(
            f"LOBPCG's eigenpairs failed the residual/orthonormality check for {redone}; "
            f"they were solved again with {EIGH_BACKEND}",
            RuntimeWarning,
        )
        backend += f" + {EIGH_BACKEND} for {len(redone)} modules"
    report_damping_escalations(escalations)
    return Solution({name: result[name] for name in context.names}, backend)


def _solve_unit(
    context: SolveContext,
    names: List[str],
    clock: PhaseClock,
    bar,
    result: Dict[str, ModuleInit],
    backends: set,
    redone: List[str],
    escalations: List["DampingEscalation"],
) -> None:
    """Prepare and solve the modules ``names`` (whole input groups), adding to the
    caller's ``result``, ``backends``, ``redone`` and ``escalations``."""
    stats, settings = context.statistics, context.settings
    first_member: Dict[int, str] = {}
    for name in names:
        first_member.setdefault(stats.modules[name].group_index, name)
    by_group = batched.prepare_input_factors(  # Z = Σ m a aᵀ / |T|, scaled in the float64 stack
        {group: stats.groups[group].input_factor_sum for group in first_member},
        first_member,
        settings.damping,
        scale={group: 1.0 / tokens for group, tokens in stats.group_tokens().items() if group in first_member},
    )
    members = {group: stats.groups[group].members for group in by_group}
    escalations.extend(damping_escalations(by_group, members, settings.damping, stats.group_tokens()))
    factors = {name: by_group[stats.modules[name].group_index] for name in names}
    batches = batched.solve_batches({name: tuple(stats.modules[name].grad_sum.shape) for name in names})
    start_blocks: Dict[str, torch.Tensor] = {}  # LOBPCG starts near Δ̂'s top left singular subspace
    prepared = batched.prepare_modules(
        batches,
        {name: stats.modules[name].grad_sum for name in names},
        {name: stats.output_factor_diag(name) for name in names},
        factors,
        damping=settings.damping,
        train_size=context.train_size,
        gradient_scale=1.0 / stats.num_samples,  # G = grad_sum / n, applied in float64
        seed=settings.seed,
        start_blocks=start_blocks,
    )
    unit_context = dataclasses.replace(context, names=names)
    preconditioners, shifts = _preconditioners(unit_context, prepared, by_group)

    def finish(name: str, eigenvalues: torch.Tensor, vectors: torch.Tensor) -> ModuleInit:
        bar.update(1)
        return finish_module(
            name, prepared[name], eigenvalues, vectors,
            gamma=settings.gamma, damping=factors[name].damping, input_group=context.input_group(name),
        )

    for batch in batches:
        # the batch's Δ̂, Cholesky factors and preconditioners are equally spaced in the
        # batched tensors made above: strided views, not fresh copies (stack_views)
        groups = [stats.modules[name].group_index for name in batch]
        operator = LoraDAOperator(
            delta=batched.stack_views([prepared[name].delta_hat for name in batch]),
            cholesky=batched.stack_views([factors[name].cholesky for name in batch]),
            alpha=settings.alpha,
            variance_scale=[settings.beta * prepared[name].variance_scale for name in batch],
            preconditioner_cholesky=batched.stack_views([preconditioners[g] for g in groups]) if preconditioners else None,
            preconditioner_shift=[shifts[g] for g in groups] if preconditioners else None,
        )
        clock.lap("factor_prep")
        starts = [start_blocks.get(name) for name in batch]
        initial = batched.stack_views(starts) if all(s is not None for s in starts) else None
        solution = lobpcg(operator, settings.rank, seed=settings.seed, initial=initial)
        failed = failed_eigenpairs(operator, solution).tolist()
        backends.add(solution.backend)
        for index, name in enumerate(batch):
            if failed[index]:  # never used silently: solved again densely, and reported
                redone.append(name)
                eigenvalues, vectors = dense_eigenpairs(
                    prepared[name], factors[name], rank=settings.rank, alpha=settings.alpha, beta=settings.beta
                )
                result[name] = finish(name, eigenvalues, vectors)
            else:
                result[name] = finish(name, solution.eigenvalues[index], solution.eigenvectors[index])
        del operator, solution
        clock.lap("solve")


def solve(context: SolveContext) -> Solution:
    """Steps 1-7 for every module of ``context.names`` with the configured solver."""
    return solve_dense(context) if context.settings.solver == "eigh" else solve_batched(context)


def solve_modules(
    stats: KFACStatistics,
    settings: Settings,
    train_size: int,
    names: Optional[Iterable[str]] = None,
    *,
    timings: Optional[Dict[str, float]] = None,
) -> Tuple[Dict[str, ModuleInit], str]:
    """LoRA-DA's solve on statistics already collected (e.g. to compare solvers on one
    pass, as the benchmarks do): every module of ``stats`` or those in ``names``.
    Returns the module inits and the solver backend's name; adds the seconds of
    ``factor_prep`` and ``solve`` to ``timings`` when given."""
    names = list(stats.modules) if names is None else list(names)
    context = SolveContext(
        settings=settings,
        options=NoOptions(),
        targets={},
        names=names,
        statistics=stats,
        train_size=train_size,
        timings={} if timings is None else timings,
    )
    modules, backend = solve(context)
    return modules, backend


METHOD = register(
    Method(
        name="lora-da",
        solve=solve,
        statistics=FULL_STATISTICS,
        uses_train_size=True,
        splits_solves=True,
    )
)
