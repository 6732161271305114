"""``lora_da.initialize``: statistics pass, then the per-module solves."""

from __future__ import annotations

import time
import warnings
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from . import distributed
from .config import LoraDAConfig, TargetModules, TokenMask
from .methods import check_loader, initialize_method
from .method import InputFactor, PreparedModule, dense_eigenpairs, finish_module, prepare_input_factor, prepare_module
from .result import LoraInit, ModuleInit
from .solvers import EIGH_BACKEND, LoraDAOperator, failed_eigenpairs, guidance_preconditioner, lobpcg
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
    checkpoint_path = config.stats_checkpoint
    if checkpoint_path is not None and run_distributed:
        checkpoint_path = f"{checkpoint_path}.rank{dist.get_rank()}"

    def statistics_pass() -> KFACStatistics:
        return collect_statistics(
            model,
            loader,
            modules,
            token_mask=config.token_mask,
            loss_fn=config.loss_fn,
            max_batches=config.max_batches,
            progress=config.progress,
            stats_backend=config.stats_backend,
            check_totals=not run_distributed,
            stats_checkpoint=checkpoint_path,
            checkpoint_every=config.checkpoint_every,
        )

    timings: Dict[str, float] = {}
    if run_distributed:
        stats = distributed.run_agreeing("the statistics pass", statistics_pass)
        timings["statistics"] = time.perf_counter() - start
        reduce_start = time.perf_counter()
        distributed.synchronize_layout(stats, modules, model_device(model))
        distributed.all_reduce_statistics(stats)
        stats.check_totals()  # the same totals on every rank: all raise alike
        timings["all_reduce"] = time.perf_counter() - reduce_start
    else:
        stats = statistics_pass()
        timings["statistics"] = time.perf_counter() - start

    train_size = config.train_size
    if train_size is None:
        train_size = stats.num_samples
        warnings.warn(
            f"train_size not given: the variance term assumes a fine-tuning set of {train_size} samples "
            "(the calibration set); pass train_size=len(train_dataset)",
            UserWarning,
            stacklevel=3,
        )
    solve_start = time.perf_counter()
    backends = {"statistics": stats.backend}
    if run_distributed:
        owners = distributed.assign_groups(stats, dist.get_world_size())
        my_names = [name for name, owner in owners.items() if owner == dist.get_rank()]
        mine, backends["solve"] = distributed.run_agreeing(
            "the solves", lambda: solve_modules(stats, config, train_size, my_names)
        )
        timings["solve"] = time.perf_counter() - solve_start
        gather_start = time.perf_counter()
        module_inits = distributed.gather_module_inits(
            mine, owners, stats, config.rank, model_device(model), config.gather_to
        )
        timings["gather"] = time.perf_counter() - gather_start
        backends["distributed"] = f"torch.distributed ({dist.get_backend()}, {dist.get_world_size()} ranks)"
    else:
        module_inits, backends["solve"] = solve_modules(stats, config, train_size)
        timings["solve"] = time.perf_counter() - solve_start
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
    )


def solve_modules(
    stats: KFACStatistics, config: LoraDAConfig, train_size: int, names: Optional[Iterable[str]] = None
) -> Tuple[Dict[str, ModuleInit], str]:
    """Steps 1-7 of SPEC.md for every module (or those in ``names``).

    ``Z`` is factored once per input group. With ``config.solver == "auto"`` the
    eigenproblems of all modules of one shape ``(d_in, d_out)`` are solved in one
    batched LOBPCG call on the operator form of Ω (``lora_da.solvers.LoraDAOperator``,
    neither Ω nor Z⁻¹ formed), preconditioned with ``(βcZ⁻¹ + αI)⁻¹``; with ``"eigh"`` each Ω is formed and decomposed
    densely in float64. Returns the module inits and the solver backend's name.
    """
    names = list(stats.modules) if names is None else list(names)
    by_group: Dict[int, InputFactor] = {}
    input_factors: Dict[str, InputFactor] = {}
    prepared: Dict[str, PreparedModule] = {}
    for name in names:
        group_index = stats.modules[name].group_index
        if group_index not in by_group:
            by_group[group_index] = prepare_input_factor(stats.input_factor(name), config.damping, name)
        input_factors[name] = by_group[group_index]
        prepared[name] = prepare_module(
            name,
            stats.gradient(name),
            input_factors[name],
            stats.output_factor_diag(name),
            damping=config.damping,
            train_size=train_size,
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
        for name in names:
            eigenvalues, vectors = dense_eigenpairs(
                prepared[name], input_factors[name], rank=config.rank, alpha=config.alpha, beta=config.beta
            )
            result[name] = module_init(name, eigenvalues, vectors)
        bar.close()
        return result, EIGH_BACKEND

    # One preconditioner P = (βcZ⁻¹ + αI)⁻¹ per input group (P need not be exact: the
    # group's members differ only in βc, for which the geometric mean is used).
    # With α > 0, βcI + αZ is positive definite.
    preconditioners: Dict[int, torch.Tensor] = {}

    def preconditioner_of(name: str) -> torch.Tensor:
        group_index = stats.modules[name].group_index
        if group_index not in preconditioners:
            members = [m for m in names if stats.modules[m].group_index == group_index]
            scales = torch.tensor([config.beta * prepared[m].variance_scale for m in members], dtype=torch.float64)
            mean_scale = float(scales.clamp(min=1e-300).log().mean().exp()) if config.beta > 0 else 0.0
            preconditioners[group_index] = guidance_preconditioner(input_factors[name].matrix, config.alpha, mean_scale)
        return preconditioners[group_index]

    shapes: Dict[Tuple[int, int], List[str]] = {}
    for name in names:
        shapes.setdefault(tuple(prepared[name].delta_hat.shape), []).append(name)
    backends = set()
    redone: List[str] = []
    for same_shape in shapes.values():
        operator = LoraDAOperator(
            delta=torch.stack([prepared[name].delta_hat for name in same_shape]),
            cholesky=torch.stack([input_factors[name].cholesky for name in same_shape]),
            alpha=config.alpha,
            variance_scale=[config.beta * prepared[name].variance_scale for name in same_shape],
            preconditioner=torch.stack([preconditioner_of(name) for name in same_shape]) if config.alpha > 0 else None,
        )
        solution = lobpcg(operator, config.rank, seed=config.seed)
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
