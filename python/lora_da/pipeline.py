"""The one driver every method shares.

    find targets → plan passes (memory budget) → statistics pass(es) → all-reduce
    → the method's solve → :class:`LoraInit`

A method (:mod:`lora_da.methods`) says which statistics it needs and solves one
pass's modules; everything else — the memory budget, resumable checkpoints,
``torch.distributed``, the phase timings, the train-size warning — is done here,
once, for all of them.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
from torch import nn

from . import distributed, distributed_agreement
from .config import LoraDAConfig
from .expert_fallback import take_sparse_experts
from .experts import expert_layout
from .kernels.dispatch import select_backend
from .layers import is_conv1d
from .memory import (
    StatisticsSizes,
    is_reiterable,
    plan_passes,
    solve_budget,
    solve_reserve,
    statistics_budget,
    statistics_share,
)
from .memory_peaks import PhasePeaks, PhaseTimings, release_free_memory
from .methods import get_method
from .methods.base import FORWARD_STATISTICS, Method, SolveContext
from .methods.lora_da_reference import one_damping_summary
from .module_init import ModuleInit
from .result import LoraInit
from .statistics import KFACStatistics, model_device, model_dtype
from .statistics_pass import collect_statistics
from .targets import find_target_modules
from .user_warnings import warn_user

# Phases of ``LoraInit.timings`` (seconds; summed over passes), besides ``total``
# (and ``all_reduce``/``gather`` under torch.distributed).
PHASES = ("forward_backward", "statistics_accumulate", "factor_prep", "solve")


def check_loader(method: Method, loader: Any) -> None:
    """``loader=None`` is allowed only for the methods that read no data."""
    if loader is None and method.needs_data:
        raise ValueError(
            f"method {method.name!r} needs calibration data: pass a loader "
            "(only the methods that read no data — lora, pissa, milora — run without one)"
        )


def plan(model: nn.Module, loader: Any, method: Method, targets: Dict[str, nn.Module], config: LoraDAConfig, budget: int):
    """The passes over the data: one per group of consecutive layers whose statistics fit
    ``budget`` (``config.max_memory`` in bytes) less the solve's reserve (all targets in one
    group for a method that reads no data)."""
    if not method.needs_data:
        return [targets]
    # the accumulators' element sizes, as the pass's backend will allocate them (Z may be float64 alone)
    dtype = model_dtype(model) or torch.float32
    backend = select_backend(model_device(model), config.stats_backend, dtype, config.statistics_precision)
    element_sizes = StatisticsSizes(
        input_factor=backend.input_factor_dtype(dtype).itemsize, gradient=backend.gradient_dtype(dtype).itemsize
    )
    passes = plan_passes(targets, statistics_share(budget, targets), element_sizes)
    if len(passes) > 1 and not is_reiterable(loader):
        raise ValueError(
            f"max_memory lets one pass hold the statistics of only part of the model ({len(passes)} passes "
            "needed), but the loader is a one-shot iterator; pass a list or a DataLoader, or raise max_memory"
        )
    return passes


def checkpoint_path(config: LoraDAConfig, pass_index: int, num_passes: int) -> Optional[str]:
    """``stats_checkpoint``, suffixed ``.pass<i>`` under several passes and ``.rank<k>`` under torch.distributed."""
    path = config.stats_checkpoint
    if path is not None and num_passes > 1:
        path = f"{path}.pass{pass_index}"
    if path is not None and distributed.is_active():
        path = f"{path}.rank{dist.get_rank()}"
    return path


def statistics_pass(
    model: nn.Module,
    loader: Any,
    targets: Dict[str, nn.Module],
    config: LoraDAConfig,
    method: Method,
    path: Optional[str],
    timings: Dict[str, float],
) -> KFACStatistics:
    """One statistics pass over ``loader``; all-reduced (and its totals checked alike on
    every rank) under torch.distributed. Adds its seconds to ``timings``."""
    run_distributed = distributed.is_active()
    if run_distributed and distributed_agreement.forward_is_collective(model):  # FSDP2: the ranks agree before each batch
        loader = distributed_agreement.AgreedBatches(loader, config.max_batches, model_device(model))

    def collect() -> KFACStatistics:
        return collect_statistics(
            model,
            loader,
            targets,
            token_mask=config.token_mask,
            loss_fn=config.loss_fn,
            max_batches=config.max_batches,
            progress=config.progress,
            stats_backend=config.stats_backend,
            statistics_precision=config.statistics_precision,
            check_totals=not run_distributed,
            stats_checkpoint=path,
            checkpoint_every=config.checkpoint_every,
            # the all-reduce expects G and y: a forward-only pass only on a single process
            forward_only=method.statistics == FORWARD_STATISTICS and not run_distributed,
        )

    start = time.perf_counter()
    stats = distributed.run_agreeing("the statistics pass", collect) if run_distributed else collect()
    timings["statistics_accumulate"] += stats.accumulate_seconds
    timings["forward_backward"] += max(time.perf_counter() - start - stats.accumulate_seconds, 0.0)
    if run_distributed:
        reduce_start = time.perf_counter()
        distributed.synchronize_layout(stats, targets, model_device(model))
        distributed.all_reduce_statistics(stats)
        stats.check_totals()  # the same totals on every rank: all raise alike
        timings["all_reduce"] = timings.get("all_reduce", 0.0) + time.perf_counter() - reduce_start
    return stats


def solve_pass(
    method: Method, context: SolveContext, model: nn.Module, config: LoraDAConfig
) -> tuple[Dict[str, ModuleInit], str]:
    """The method's solve on one pass. Under torch.distributed a method that splits
    solves gets this rank's share of whole input groups, and the factors are gathered;
    the others solve every module on every rank."""
    timings = context.timings
    before = timings["factor_prep"] + timings["solve"]
    start = time.perf_counter()
    if not (distributed.is_active() and method.splits_solves):
        modules, backend = method.solve(context)
    else:
        stats = context.statistics
        owners = distributed.assign_groups(stats, dist.get_world_size())
        context.names = [name for name in context.names if owners[name] == dist.get_rank()]
        mine, backend = distributed.run_agreeing("the solves", lambda: method.solve(context))
        gather_start = time.perf_counter()
        modules = distributed.gather_module_inits(
            mine, owners, stats, config.rank, model_device(model), config.gather_to
        )
        timings["gather"] = timings.get("gather", 0.0) + time.perf_counter() - gather_start
        start += time.perf_counter() - gather_start  # the gather is not solve time
    booked = timings["factor_prep"] + timings["solve"] - before
    timings["solve"] += max(time.perf_counter() - start - booked, 0.0)  # what the method did not book itself
    return modules, backend


def run(model: nn.Module, loader: Any, config: LoraDAConfig) -> LoraInit:
    """Everything :func:`lora_da.initialize` does, for every method (see the module doc).
    The methods' damping escalations give one warning per call, however many passes."""
    with one_damping_summary(), PhasePeaks(model_device(distributed.unwrap_model(model))) as peaks:
        return _run(model, loader, config, peaks)


def _run(model: nn.Module, loader: Any, config: LoraDAConfig, peaks: PhasePeaks) -> LoraInit:
    start = time.perf_counter()
    method = get_method(config.method)
    options = config.options
    model = distributed.unwrap_model(model)

    budget = statistics_budget(config.max_memory, model_device(model))  # bytes: statistics + solve

    def prepare():
        targets = find_target_modules(model, config.target_modules, config.rank)
        check_loader(method, loader)
        method.check_targets(targets, config.rank, options)
        return targets, plan(model, loader, method, targets, config, budget)

    # under torch.distributed every rank checks that all were called alike (or all raise the same error)
    targets, passes = distributed_agreement.agree(config, model, loader, prepare) if distributed.is_active() else prepare()

    timings: Dict[str, float] = PhaseTimings(PHASES, peaks)  # the methods' phase laps end memory phases too
    backends: Dict[str, str] = {}
    modules: Dict[str, ModuleInit] = {}
    train_size = config.train_size
    statistics_bytes = 0
    stats: Optional[KFACStatistics] = None
    context: Optional[SolveContext] = None
    expert_fallbacks: List[str] = []
    for pass_index, pass_targets in enumerate(passes):
        stats = context = None  # the previous pass's sums are freed before this pass allocates its own
        if method.needs_data:
            path = checkpoint_path(config, pass_index, len(passes))
            stats = statistics_pass(model, loader, pass_targets, config, method, path, timings)
            peaks.mark("statistics_pass")
            release_free_memory()  # the batches' freed activations, before the float64 preparation
            statistics_bytes = max(statistics_bytes, stats.nbytes())
            backends["statistics"] = stats.backend + ("" if stats.has_gradients else " (forward only)")
            if train_size is None:
                train_size = stats.num_samples
                if method.uses_train_size:
                    warn_user(
                        f"train_size not given: the variance term assumes a fine-tuning set of {train_size} "
                        "samples (the calibration set); pass train_size=len(train_dataset)"
                    )
        context = SolveContext(
            settings=config,
            options=options,
            targets=pass_targets,
            names=list(pass_targets),
            statistics=stats,
            train_size=train_size or 0,
            timings=timings,
            # what this pass's statistics leave of max_memory to the float64 preparation and solve
            solve_memory_budget=solve_budget(
                budget, stats.nbytes() if stats is not None else 0, solve_reserve(pass_targets),
                given=config.max_memory is not None,
            ),
        )
        fallbacks = take_sparse_experts(context)  # experts with too few routed tokens: PEFT's default init
        pass_modules, backends["solve"] = solve_pass(method, context, model, config)
        modules.update(pass_modules)
        modules.update(fallbacks)
        expert_fallbacks.extend(fallbacks)
    if distributed.is_active():
        backends["distributed"] = f"torch.distributed ({dist.get_backend()}, {dist.get_world_size()} ranks)"
    # recorded after the gather, so that every rank's copy knows its layout (PEFT's fan_in_fan_out)
    modules = {
        name: dataclasses.replace(modules[name], transposed_weight=is_conv1d(targets[name]))
        for name in targets
        if name in modules
    }
    timings = dict(timings)
    timings["total"] = time.perf_counter() - start
    counts = _counts(stats)
    return LoraInit(
        modules=modules,
        config=config,
        train_size=train_size or 0,
        timings=timings,
        backends=backends,
        passes=len(passes),
        statistics_bytes=statistics_bytes,
        memory=peaks.result(),
        experts=expert_layout(targets),
        expert_fallbacks=[name for name in targets if name in set(expert_fallbacks)],
        **counts,
    )


def _counts(stats: Optional[KFACStatistics]) -> Dict[str, int]:
    """The loader bookkeeping of the last pass (every pass reads the same batches); zeros without data."""
    fields: List[str] = ["num_samples", "num_tokens", "num_batches", "skipped_batches", "skipped_samples"]
    return {field: (getattr(stats, field) if stats is not None else 0) for field in fields}
