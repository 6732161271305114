"""``lora_da.initialize``: statistics pass, then the per-module solves."""

from __future__ import annotations

import time
import warnings
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from . import batched, distributed
from .config import LoraDAConfig, TargetModules, TokenMask
from .methods import check_loader, initialize_method
from .method import InputFactor, PreparedModule, dense_eigenpairs, finish_module, prepare_input_factor, prepare_module
from .result import LoraInit, ModuleInit
from .solvers import EIGH_BACKEND, LoraDAOperator, failed_eigenpairs, lobpcg
from .memory import is_reiterable, plan_passes, statistics_budget
from .statistics import KFACStatistics, model_device, collect_statistics
from .targets import find_target_modules


def initialize(
    model: nn.Module,
    loader: Any,
    rank: int = 8,
    *,
    target_modules: TargetModules = None,
    alpha: float = 1.0,
    beta: float = 0.03,
    gamma: float = 1024.0,
    damping: float = 1e-6,
    train_size: Optional[int] = None,
    token_mask: TokenMask = "attention",
    loss_fn: Optional[Callable[[nn.Module, Any], torch.Tensor]] = None,
    max_batches: Optional[int] = None,
    preserve_output: bool = False,
    seed: int = 0,
    progress: bool = True,
    stats_backend: str = "auto",
    gather_to: Optional[int] = None,
    stats_checkpoint: Optional[str] = None,
    checkpoint_every: int = 50,
    solver: str = "auto",
    max_memory: Union[None, int, float] = None,
    method: str = "lora-da",
    method_options: Optional[Mapping[str, float]] = None,
) -> LoraInit:
    """Compute LoRA-DA's data-aware LoRA initialization of ``model``.

    One hooked forward+backward pass per batch of ``loader`` gathers, for every
    target module, the gradient ``G``, the input factor ``Z`` (shared by modules
    fed the same input tensor) and the diagonal output factor ``y``; then each
    module's Initialization Guidance Matrix Ω is built and its ``rank`` smallest
    eigenvectors give ``lora_A`` and ``lora_B`` (math: ``lora_da.method``).

    Args:
        model: any ``nn.Module``; left exactly as found (hooks, ``training``,
            ``requires_grad``), also when this raises.
        loader: an iterable of batches. With the default loss, dict-like
            batches with ``input_ids``, ``labels`` (-100 = no loss) and
            optionally ``attention_mask``, as for a Hugging Face causal LM.
        rank: LoRA rank ``r``.
        loss_fn: ``loss_fn(model, batch) -> per-sample losses`` (1-D) for
            models that are not causal LMs. Default: each sample's mean
            next-token loss, so results do not depend on the batch size.
        solver: ``"auto"`` (the compiled batched LOBPCG, all same-shape modules
            in one call) or ``"eigh"`` (dense float64 ``torch.linalg.eigh``, the oracle).
        stats_backend: ``"auto"`` (Triton kernels on CUDA, PyTorch elsewhere),
            ``"torch"`` or ``"triton"``; ``result.backends["statistics"]`` says which ran.
        gather_to: under ``torch.distributed``, the rank that receives every
            module's factors (``None``: all ranks do; other ranks then return
            only the modules they solved).
        max_memory: budget for the statistics held at once (bytes, or a
            fraction of free device memory; default half of it). The whole
            model's statistics go in one pass when they fit; otherwise the
            layers are split over several passes (``result.passes``).
        method: ``"lora-da"`` (default), or one of the other initializations
            computed from the same statistics pass (``"lora"``, ``"pissa"``,
            ``"milora"``, ``"lora-ga"``, ``"lora-one"``, ``"cntlora"``,
            ``"fisher-subspace"``; criteria in :mod:`lora_da.methods`). Each
            collects only what it needs: ``lora``/``pissa``/``milora`` take
            ``loader=None``, ``cntlora`` runs forward passes only.
        method_options: method-specific options (see ``lora_da.methods.METHOD_OPTIONS``).
        Other arguments: see :class:`lora_da.LoraDAConfig`.

    Returns:
        a :class:`LoraInit`; ``.apply(peft_model)`` or ``.save_pretrained(dir)``.
        ``result.timings`` has the seconds of each phase: ``forward_backward``
        (the model's own passes), ``statistics_accumulate`` (Z, y, G inside the
        pass), ``factor_prep`` (float64 Cholesky, Δ, σ, preconditioners),
        ``solve`` (eigensolves) and ``total``; ``result.statistics_bytes`` the
        peak memory of the statistics.
    """
    config = LoraDAConfig(
        rank=rank,
        target_modules=target_modules,
        alpha=alpha,
        beta=beta,
        gamma=gamma,
        damping=damping,
        train_size=train_size,
        token_mask=token_mask,
        max_batches=max_batches,
        preserve_output=preserve_output,
        seed=seed,
        progress=progress,
        loss_fn=loss_fn,
        stats_backend=stats_backend,
        gather_to=gather_to,
        stats_checkpoint=stats_checkpoint,
        checkpoint_every=checkpoint_every,
        solver=solver,
        max_memory=max_memory,
        method=method,
        method_options=method_options,
    )
    return initialize_from_config(model, loader, config)


def initialize_from_config(model: nn.Module, loader: Any, config: LoraDAConfig) -> LoraInit:
    """:func:`initialize` with the options given as a :class:`LoraDAConfig`.

    Under ``torch.distributed`` (an initialized process group of more than one
    rank) every rank must call this with its own share of the data; see
    :mod:`lora_da.distributed`.
    """
    start = time.perf_counter()
    model = distributed.unwrap_model(model)
    modules = find_target_modules(model, config.target_modules, config.rank)
    if config.method != "lora-da":  # the other initializations share the pass (lora_da.methods)
        return initialize_method(model, loader, config, modules)
    check_loader(config.method, loader)
    run_distributed = distributed.is_active()
    device = model_device(model)
    element_size = 8 if _model_dtype(model) == torch.float64 else 4  # the statistics' accumulator dtype
    passes = plan_passes(modules, statistics_budget(config.max_memory, device), element_size)
    if len(passes) > 1 and not is_reiterable(loader):
        raise ValueError(
            f"max_memory lets one pass hold the statistics of only part of the model ({len(passes)} passes "
            "needed), but the loader is a one-shot iterator; pass a list or a DataLoader, or raise max_memory"
        )

    timings: Dict[str, float] = {phase: 0.0 for phase in PHASES}
    backends: Dict[str, str] = {}
    module_inits: Dict[str, ModuleInit] = {}
    train_size = config.train_size
    statistics_bytes = 0
    stats: Optional[KFACStatistics] = None
    for pass_index, pass_modules in enumerate(passes):
        checkpoint_path = config.stats_checkpoint
        if checkpoint_path is not None and len(passes) > 1:
            checkpoint_path = f"{checkpoint_path}.pass{pass_index}"
        if checkpoint_path is not None and run_distributed:
            checkpoint_path = f"{checkpoint_path}.rank{dist.get_rank()}"

        def statistics_pass() -> KFACStatistics:
            return collect_statistics(
                model,
                loader,
                pass_modules,
                token_mask=config.token_mask,
                loss_fn=config.loss_fn,
                max_batches=config.max_batches,
                progress=config.progress,
                stats_backend=config.stats_backend,
                check_totals=not run_distributed,
                stats_checkpoint=checkpoint_path,
                checkpoint_every=config.checkpoint_every,
            )

        pass_start = time.perf_counter()
        stats = None  # the previous pass's sums are freed before this pass allocates its own
        if run_distributed:
            stats = distributed.run_agreeing("the statistics pass", statistics_pass)
            _add_pass_time(timings, stats, time.perf_counter() - pass_start)
            reduce_start = time.perf_counter()
            distributed.synchronize_layout(stats, pass_modules, device)
            distributed.all_reduce_statistics(stats)
            stats.check_totals()  # the same totals on every rank: all raise alike
            timings["all_reduce"] = timings.get("all_reduce", 0.0) + time.perf_counter() - reduce_start
        else:
            stats = statistics_pass()
            _add_pass_time(timings, stats, time.perf_counter() - pass_start)
        statistics_bytes = max(statistics_bytes, stats.nbytes())
        backends["statistics"] = stats.backend

        if train_size is None:
            train_size = stats.num_samples
            warnings.warn(
                f"train_size not given: the variance term assumes a fine-tuning set of {train_size} samples "
                "(the calibration set); pass train_size=len(train_dataset)",
                UserWarning,
                stacklevel=3,
            )
        if run_distributed:
            owners = distributed.assign_groups(stats, dist.get_world_size())
            my_names = [name for name, owner in owners.items() if owner == dist.get_rank()]
            mine, backends["solve"] = distributed.run_agreeing(
                "the solves", lambda: solve_modules(stats, config, train_size, my_names, timings=timings)
            )
            gather_start = time.perf_counter()
            module_inits.update(
                distributed.gather_module_inits(mine, owners, stats, config.rank, device, config.gather_to)
            )
            timings["gather"] = timings.get("gather", 0.0) + time.perf_counter() - gather_start
            backends["distributed"] = f"torch.distributed ({dist.get_backend()}, {dist.get_world_size()} ranks)"
        else:
            inits, backends["solve"] = solve_modules(stats, config, train_size, timings=timings)
            module_inits.update(inits)
    timings["total"] = time.perf_counter() - start
    return LoraInit(
        modules=module_inits,
        config=config,
        train_size=train_size,
        num_samples=stats.num_samples,
        num_tokens=stats.num_tokens,
        num_batches=stats.num_batches,
        skipped_batches=stats.skipped_batches,
        skipped_samples=stats.skipped_samples,
        timings=timings,
        backends=backends,
        passes=len(passes),
        statistics_bytes=statistics_bytes,
    )


# Phases of ``LoraInit.timings`` (seconds; summed over passes), besides ``total``.
PHASES = ("forward_backward", "statistics_accumulate", "factor_prep", "solve")


def _add_pass_time(timings: Dict[str, float], stats: KFACStatistics, seconds: float) -> None:
    """Split one statistics pass into the model's forward+backward and our accumulation."""
    timings["statistics_accumulate"] += stats.accumulate_seconds
    timings["forward_backward"] += max(seconds - stats.accumulate_seconds, 0.0)


def _model_dtype(model: nn.Module) -> Optional[torch.dtype]:
    for parameter in model.parameters():
        if parameter.is_floating_point():
            return parameter.dtype
    return None


def solve_modules(
    stats: KFACStatistics,
    config: LoraDAConfig,
    train_size: int,
    names: Optional[Iterable[str]] = None,
    *,
    timings: Optional[Dict[str, float]] = None,
) -> Tuple[Dict[str, ModuleInit], str]:
    """Steps 1-7 of SPEC.md for every module (or those in ``names``).

    ``Z`` is factored once per input group. With ``config.solver == "auto"`` the
    eigenproblems of all modules of one shape ``(d_in, d_out)`` are solved in one
    batched LOBPCG call on the operator form of Ω (``lora_da.solvers.LoraDAOperator``,
    neither Ω nor Z⁻¹ formed), preconditioned with ``(βcZ⁻¹ + αI)⁻¹``; with ``"eigh"`` each Ω is formed and decomposed
    densely in float64. Returns the module inits and the solver backend's name;
    adds the seconds of the float64 preparation (``factor_prep``) and of the
    eigensolves (``solve``) to ``timings`` when given.
    """
    names = list(stats.modules) if names is None else list(names)
    timings = {} if timings is None else timings
    timings.setdefault("factor_prep", 0.0)
    timings.setdefault("solve", 0.0)
    clock = time.perf_counter()

    def lap(phase: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[phase] += now - clock
        clock = now

    first_member: Dict[int, str] = {}
    for name in names:
        first_member.setdefault(stats.modules[name].group_index, name)
    if config.solver == "eigh":  # the oracle: the per-module reference functions of lora_da.method
        by_group = {
            group: prepare_input_factor(stats.input_factor(name), config.damping, name)
            for group, name in first_member.items()
        }
    else:  # the same quantities, batched over same-shape problems
        by_group = batched.prepare_input_factors(
            {group: stats.input_factor(name) for group, name in first_member.items()}, first_member, config.damping
        )
    input_factors: Dict[str, InputFactor] = {name: by_group[stats.modules[name].group_index] for name in names}
    start_blocks: Dict[str, torch.Tensor] = {}  # LOBPCG starts near Δ̂'s top left singular subspace
    if config.solver == "eigh":
        prepared: Dict[str, PreparedModule] = {
            name: prepare_module(
                name,
                stats.gradient(name),
                input_factors[name],
                stats.output_factor_diag(name),
                damping=config.damping,
                train_size=train_size,
            )
            for name in names
        }
    else:
        prepared = batched.prepare_modules(
            names,
            {name: stats.modules[name].grad_sum for name in names},
            {name: stats.output_factor_diag(name) for name in names},
            input_factors,
            damping=config.damping,
            train_size=train_size,
            gradient_scale=1.0 / stats.num_samples,  # G = grad_sum / n, applied in float64
            seed=config.seed,
            start_blocks=start_blocks,
        )

    def module_init(name: str, eigenvalues: torch.Tensor, vectors: torch.Tensor) -> ModuleInit:
        factors = finish_module(name, prepared[name], eigenvalues, vectors, gamma=config.gamma)
        bar.update(1)
        return ModuleInit(
            name=name,
            lora_A=factors.lora_A,
            lora_B=factors.lora_B,
            eigenvalues=factors.eigenvalues,
            sigma=factors.sigma,
            variance_scale=factors.variance_scale,
            damping=input_factors[name].damping,
            input_group=stats.groups[stats.modules[name].group_index].members,
        )

    result: Dict[str, ModuleInit] = {}
    bar = tqdm(total=len(names), desc="lora-da solves", unit="module", disable=not config.progress, leave=False)
    if config.solver == "eigh":
        lap("factor_prep")
        for name in names:
            eigenvalues, vectors = dense_eigenpairs(
                prepared[name], input_factors[name], rank=config.rank, alpha=config.alpha, beta=config.beta
            )
            result[name] = module_init(name, eigenvalues, vectors)
        bar.close()
        lap("solve")
        return result, EIGH_BACKEND

    # One preconditioner P = (βcZ⁻¹ + αI)⁻¹ per input group, as the Cholesky factor of
    # M = βcI + αZ (P need not be exact: the group's members differ only in βc, for
    # which the geometric mean is used). With α > 0, M is positive definite.
    preconditioners: Dict[int, torch.Tensor] = {}
    group_scales: Dict[int, float] = {}
    if config.alpha > 0:
        for group in first_member:
            members = [m for m in names if stats.modules[m].group_index == group]
            scales = torch.tensor([config.beta * prepared[m].variance_scale for m in members], dtype=torch.float64)
            group_scales[group] = float(scales.clamp(min=1e-300).log().mean().exp()) if config.beta > 0 else 0.0
        preconditioners = batched.guidance_preconditioners(by_group, group_scales, config.alpha, overwrite_matrices=True)

    # One solver call per shape and module kind ("layers.*.q_proj"): the kind's Δ̂, Cholesky
    # factors and preconditioners then sit equally spaced in the batched tensors made above,
    # and reach the solver as strided views, not as fresh copies (batched.stack_views).
    shapes: Dict[Tuple[Tuple[int, int], str], List[str]] = {}
    for name in names:
        shapes.setdefault((tuple(prepared[name].delta_hat.shape), batched.module_kind(name)), []).append(name)
    backends = set()
    redone: List[str] = []
    for same_shape in shapes.values():
        groups = [stats.modules[name].group_index for name in same_shape]
        operator = LoraDAOperator(
            delta=batched.stack_views([prepared[name].delta_hat for name in same_shape]),
            cholesky=batched.stack_views([input_factors[name].cholesky for name in same_shape]),
            alpha=config.alpha,
            variance_scale=[config.beta * prepared[name].variance_scale for name in same_shape],
            preconditioner_cholesky=batched.stack_views([preconditioners[g] for g in groups]) if preconditioners else None,
            preconditioner_shift=[group_scales[g] for g in groups] if preconditioners else None,
        )
        lap("factor_prep")
        starts = [start_blocks.get(name) for name in same_shape]
        initial = batched.stack_views(starts) if all(s is not None for s in starts) else None
        solution = lobpcg(operator, config.rank, seed=config.seed, initial=initial)
        failed = failed_eigenpairs(operator, solution).tolist()
        backends.add(solution.backend)
        for index, name in enumerate(same_shape):
            if failed[index]:  # never used silently: solved again densely, and reported
                redone.append(name)
                eigenvalues, vectors = dense_eigenpairs(
                    prepared[name], input_factors[name], rank=config.rank, alpha=config.alpha, beta=config.beta
                )
                result[name] = module_init(name, eigenvalues, vectors)
            else:
                result[name] = module_init(name, solution.eigenvalues[index], solution.eigenvectors[index])
        lap("solve")
    bar.close()
    backend = ", ".join(sorted(backends))
    if redone:
        warnings.warn(
            f"LOBPCG's eigenpairs failed the residual/orthonormality check for {redone}; "
            f"they were solved again with {EIGH_BACKEND}",
            RuntimeWarning,
            stacklevel=3,
        )
        backend += f" + {EIGH_BACKEND} for {len(redone)} modules"
    return {name: result[name] for name in names}, backend
