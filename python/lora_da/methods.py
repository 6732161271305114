"""The other initializations served by the same engine: ``initialize(..., method=...)``.

Every method shares the one statistics pass of :mod:`lora_da.statistics` and
collects only what it needs:

==================  ==========================  =================  ====================
method              needs                       base weight W      factors given for
==================  ==========================  =================  ====================
``lora``            nothing (no loader)         unchanged          any s (B = 0)
``pissa``           W (no loader)               W − s·B·A          s = 1 (÷√s on apply)
``milora``          W (no loader)               W − s·B·A          s = 1 (÷√s on apply)
``lora-ga``         G (forward+backward)        W − s·B·A          any s
``lora-one``        G (forward+backward)        unchanged          any s
``cntlora``         Z, W (forward only)         unchanged          s = 1 (÷√s on apply)
``fisher-subspace`` G, Z, y (forward+backward)  unchanged          any s
==================  ==========================  =================  ====================

``s`` is the PEFT layer's scaling (``lora_alpha/r`` or ``lora_alpha/√r``). Methods
whose published recipe fixes the *product* ``s·B·A`` (PiSSA, MiLoRA, CNTLoRA) keep
their factors for ``s = 1``; :meth:`LoraInit.apply` and ``save_pretrained`` divide
both factors by ``√s``. Methods marked ``W − s·B·A`` change the base weight at
:meth:`LoraInit.apply` (computed there from the stored factors, as with
``preserve_output=True``), so that the model's output is unchanged at init.

Exact criteria (``W``: ``d_out x d_in``; SVDs thin, singular values descending;
all in float64; the per-method functions below hold the details):

* ``lora``: ``lora_A ~ kaiming_uniform(a=√5)`` (``U(−1/√d_in, 1/√d_in)``), ``lora_B = 0``
  (PEFT's default), one ``torch.Generator`` seeded with ``seed``, modules in order.
* ``pissa``: ``W = U S Vᵀ``; ``B = U_r √S_r``, ``A = √S_r V_rᵀ`` (top r); residual
  ``W − U_r S_r V_rᵀ`` (PiSSA; PEFT's ``init_lora_weights="pissa"``).
* ``milora``: as PiSSA with the *bottom* r singular triplets (MiLoRA).
* ``lora-ga``: ``G = U S Vᵀ``; ``A = c·V[:, :r]ᵀ``, ``B = c·U[:, r:2r]``,
  ``c = d_out^{1/4}/√γ_s`` (``stable_gamma``, default 16), base ``W − s·B·A``.
  This is the published code's default (``direction="ArB2r"``, ``scale="stable"``,
  Outsider565/LoRA-GA); the paper's theorem allows any split of the top 2r
  indices. (PEFT's port additionally multiplies B by ``S[r:2r]``; we follow the
  authors' code.) Needs ``2r ≤ min(d_in, d_out)``.
* ``lora-one``: ``−G = U S Vᵀ``; ``B = U_r √(S_r/S_1)/√γ_s``, ``A = √(S_r/S_1) V_rᵀ/√γ_s``
  (``stable_gamma``, default 64 as in the authors' LoRA-One command), base
  unchanged: ``s·B·A = s·(−G)_r/(S_1 γ_s)``, one best-rank-r gradient step
  (YuanheZ/LoRA-One, ``run_exp.py``).
* ``cntlora`` and ``fisher-subspace``: see :func:`cntlora_factors` and
  :func:`fisher_subspace_factors`. Their full papers were not available: both are
  **our reading** of the published descriptions.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any, Dict, Mapping, Optional, Tuple

import torch
from torch import nn

from .solvers import fix_column_signs
from .targets import is_conv1d, linear_dims

if TYPE_CHECKING:  # pragma: no cover
    from .config import LoraDAConfig
    from .result import LoraInit, ModuleInit
    from .statistics import KFACStatistics

METHODS = ("lora-da", "lora", "pissa", "milora", "lora-ga", "lora-one", "cntlora", "fisher-subspace")
NO_DATA_METHODS = frozenset({"lora", "pissa", "milora"})
FORWARD_ONLY_METHODS = frozenset({"cntlora"})
WEIGHT_READING_METHODS = frozenset({"pissa", "milora", "cntlora"})
BASE_OFFSET_METHODS = frozenset({"pissa", "milora", "lora-ga"})
UNIT_SCALING_METHODS = frozenset({"pissa", "milora", "cntlora"})

# Method-specific options and their defaults (as published where there is a publication).
METHOD_OPTIONS: Dict[str, Dict[str, float]] = {
    "lora-da": {},
    "lora": {},
    "pissa": {},
    "milora": {},
    "lora-ga": {"stable_gamma": 16.0},
    "lora-one": {"stable_gamma": 64.0},
    "cntlora": {"energy": 0.9, "shrinkage": 0.1},
    "fisher-subspace": {},
}


def resolve_method_options(method: str, options: Optional[Mapping[str, float]]) -> Dict[str, float]:
    """Validate ``method`` and merge ``options`` into its defaults (``ValueError`` when invalid)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(repr(m) for m in METHODS)}; got {method!r}")
    resolved = dict(METHOD_OPTIONS[method])
    for key, value in dict(options or {}).items():
        if key not in resolved:
            known = ", ".join(resolved) or "none"
            raise ValueError(f"method {method!r} has no option {key!r} (its options: {known})")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"method option {key!r} must be a finite number, got {value!r}")
        resolved[key] = float(value)
    if resolved.get("stable_gamma", 1.0) <= 0:
        raise ValueError(f"stable_gamma must be > 0, got {resolved['stable_gamma']}")
    if not 0.0 < resolved.get("energy", 0.5) <= 1.0:
        raise ValueError(f"energy must lie in (0, 1], got {resolved['energy']}")
    if not 0.0 < resolved.get("shrinkage", 0.5) <= 1.0:
        raise ValueError(f"shrinkage must lie in (0, 1], got {resolved['shrinkage']}")
    return resolved


def check_loader(method: str, loader: Any) -> None:
    """``loader=None`` is allowed only for the methods that read no data."""
    if loader is None and method not in NO_DATA_METHODS:
        raise ValueError(
            f"method {method!r} needs calibration data: pass a loader "
            f"(only {sorted(NO_DATA_METHODS)} run without one)"
        )


# -- per-module math ------------------------------------------------------------------


def weight_matrix(name: str, module: nn.Module) -> torch.Tensor:
    """``W`` as ``d_out x d_in`` float64 (GPT-2 ``Conv1D`` stores ``Wᵀ``); refuses non-float weights."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        dtype = weight.dtype if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise TypeError(
            f"module '{name}' has a {dtype} weight: this method reads W and needs a floating-point weight "
            "(dequantize the base model, or use a method that reads no weight: lora-da, lora-ga, lora-one, "
            "fisher-subspace, lora)"
        )
    w = weight.detach().to(torch.float64)
    return w.T if is_conv1d(module) else w


def _svd(matrix: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``U, S, V`` (``matrix = U diag(S) Vᵀ``) in float64."""
    u, s, vh = torch.linalg.svd(matrix.to(torch.float64), full_matrices=False)
    return u, s, vh.T


def _signed_pairs(u: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fix the sign of each singular pair (u_i, v_i) jointly: largest-magnitude entry of v_i positive."""
    fixed = fix_column_signs(v)
    flip = torch.where((fixed * v).sum(0) < 0, -1.0, 1.0).to(u.dtype)
    return u * flip, fixed


def kaiming_lora_factors(d_in: int, d_out: int, rank: int, generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """PEFT's default: ``A`` Kaiming-uniform with ``a=√5`` (bound ``1/√d_in``), ``B = 0``."""
    lora_A = torch.empty(rank, d_in, dtype=torch.float32)
    nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5), generator=generator)
    return lora_A, torch.zeros(d_out, rank, dtype=torch.float32)


def weight_svd_factors(weight: torch.Tensor, rank: int, minor: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PiSSA (``minor=False``: top r) / MiLoRA (``minor=True``: bottom r) for ``s = 1``:
    ``B = U_r √S_r``, ``A = √S_r V_rᵀ``, so ``B·A`` is that rank-r part of ``W``. Returns (A, B, S_r)."""
    u, s, v = _svd(weight)
    index = slice(s.numel() - rank, s.numel()) if minor else slice(0, rank)
    u_r, v_r = _signed_pairs(u[:, index], v[:, index])
    root = s[index].sqrt()
    return root[:, None] * v_r.T, u_r * root[None, :], s[index]


def lora_ga_factors(gradient: torch.Tensor, rank: int, stable_gamma: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LoRA-GA (ArB2r, stable scale): ``A = c·V[:, :r]ᵀ``, ``B = c·U[:, r:2r]``, ``c = d_out^{1/4}/√γ_s``.
    Returns (A, B, S[:2r])."""
    d_out = gradient.shape[0]
    u, s, v = _svd(gradient)
    scale = d_out**0.25 / math.sqrt(stable_gamma)
    _, v_a = _signed_pairs(u[:, :rank], v[:, :rank])
    u_b = fix_column_signs(u[:, rank : 2 * rank])
    return scale * v_a.T, scale * u_b, s[: 2 * rank]


def lora_one_factors(gradient: torch.Tensor, rank: int, stable_gamma: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LoRA-One: ``−G = U S Vᵀ``, ``B = U_r √(S_r/S_1)/√γ_s``, ``A = √(S_r/S_1) V_rᵀ/√γ_s``. Returns (A, B, S_r)."""
    u, s, v = _svd(-gradient)
    if float(s[0]) == 0.0:
        raise FloatingPointError("the gradient is exactly zero")
    u_r, v_r = _signed_pairs(u[:, :rank], v[:, :rank])
    root = (s[:rank] / s[0]).sqrt() / math.sqrt(stable_gamma)
    return root[:, None] * v_r.T, u_r * root[None, :], s[:rank]


def _symmetric_powers(matrix: torch.Tensor, powers: Tuple[float, ...], floor: float = 0.0) -> Tuple[torch.Tensor, ...]:
    """``matrix^p`` for each ``p`` of ``powers``, from one eigendecomposition of a symmetric
    PSD matrix (eigenvalues clamped at ``floor``), float64."""
    evals, evecs = torch.linalg.eigh(0.5 * (matrix + matrix.T))
    evals = evals.clamp(min=floor)
    return tuple((evecs * evals.pow(power)[None, :]) @ evecs.T for power in powers)


def cntlora_delta(weight: torch.Tensor, input_factor_raw: torch.Tensor, shrinkage: float) -> torch.Tensor:
    """CNTLoRA's closed-form weight estimate ``ΔW = W (T − I)`` (our reading, see :func:`cntlora_factors`)."""
    z = input_factor_raw.to(torch.float64)
    z = 0.5 * (z + z.T)
    d = torch.diagonal(z).clamp(min=0.0)
    mean = float(d.mean())
    if mean <= 0.0:
        raise FloatingPointError("the module's inputs are all zero")
    dead = d <= 1e-12 * mean
    d = torch.where(dead, torch.full_like(d, mean), d)
    root = d.sqrt()
    corr = z / root[:, None] / root[None, :]
    corr[dead, :] = 0.0
    corr[:, dead] = 0.0
    corr.fill_diagonal_(1.0)  # a correlation matrix; dead features stay uncorrelated and untouched
    identity = torch.eye(z.shape[0], dtype=torch.float64, device=z.device)
    shrunk = (1.0 - shrinkage) * corr + shrinkage * identity  # Ĉ, eigenvalues >= ρ
    z_hat = root[:, None] * shrunk * root[None, :]  # Ẑ = D^{1/2} Ĉ D^{1/2}
    floor = shrinkage * float(d.min()) * 1e-3  # Ẑ's eigenvalues are >= ρ·min(d); guard rounding only
    z_half, z_inv_half = _symmetric_powers(z_hat, (0.5, -0.5), floor)
    # T = Ẑ^{-1/2} (Ẑ^{1/2} D Ẑ^{1/2})^{1/2} Ẑ^{-1/2}: symmetric, T Ẑ T = D
    (middle,) = _symmetric_powers((z_half * d[None, :]) @ z_half, (0.5,))
    transport = z_inv_half @ middle @ z_inv_half
    return weight.to(torch.float64) @ (transport - identity)


def cntlora_factors(
    weight: torch.Tensor, input_factor_raw: torch.Tensor, max_rank: int, energy: float, shrinkage: float
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ConsNoTrainLoRA, **our reading** of its published description (the paper was not available).

    Domain-shift constraint: the adapted layer, fed the fine-tuning activations,
    should produce the output second moments that the pre-trained ``W`` produces
    for pre-training-like activations. Pre-training activations are not
    available; we model their second moment as ``Z_pt = D = diag(Z)`` (the same
    per-feature energies, no correlations: the correlations are the shift).
    With ``C = D^{-1/2} Z D^{-1/2}`` (fine-tuning correlations, ``Z`` from the
    forward pass, undamped) shrunk towards the prior, ``Ĉ = (1−ρ)C + ρI``
    (``shrinkage`` ρ, default 0.1, our choice) and ``Ẑ = D^{1/2} Ĉ D^{1/2}``, the
    constraint ``(W+ΔW) Ẑ (W+ΔW)ᵀ = W D Wᵀ`` with ``W + ΔW = W T`` holds for
    every ``T`` with ``T Ẑ Tᵀ = D``. Of those we take the one that moves the
    activations least, ``min E‖(T − I)x‖²`` over ``x ~ (0, Ẑ)``: the optimal
    transport map between the two Gaussian moments,

        ``T = Ẑ^{-1/2} (Ẑ^{1/2} D Ẑ^{1/2})^{1/2} Ẑ^{-1/2}``,  ``ΔW = W (T − I)``

    (symmetric positive definite). An earlier reading, ``T = D^{1/2}Ĉ^{-1/2}D^{-1/2}``,
    satisfies the same constraint but scales cross-feature terms by ``√(d_i/d_j)``;
    on SmolLM2 it gave ``‖ΔW‖ ≈ 60‖W‖`` and a held-out loss of 17 at init.
    ``ΔW`` depends only on W and forward activation statistics (no backward pass).
    Features with no energy are left untouched. ``ΔW = U S Vᵀ`` is decomposed
    with a per-layer rank ``k = min(r_max, max(1, min{k : Σ_{i≤k} S_i² ≥ τ Σ_i S_i²}))``
    (spectral-energy criterion, ``energy`` τ, default 0.9, our choice):
    ``B = U_k √S_k``, ``A = √S_k V_kᵀ`` for ``s = 1`` (so ``s·B·A = ΔW_k``);
    the base weight is unchanged. Returns (A, B, S[:r_max]).
    """
    delta = cntlora_delta(weight, input_factor_raw, shrinkage)
    u, s, v = _svd(delta)
    energies = s.square()
    total = float(energies.sum())
    if total == 0.0:
        k = 1
    else:
        cumulative = torch.cumsum(energies, 0) / total
        k = int((cumulative < energy - 1e-12).sum()) + 1
    k = max(1, min(max_rank, k))
    u_k, v_k = _signed_pairs(u[:, :k], v[:, :k])
    root = s[:k].sqrt()
    return root[:, None] * v_k.T, u_k * root[None, :], s[:max_rank]


def fisher_subspace_factors(
    gradient: torch.Tensor,
    cholesky: torch.Tensor,
    output_factor_diag: torch.Tensor,
    rank: int,
    damping: float,
    gamma: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Fisher-subspace initialization, **our reading** of its published description.

    K-FAC Fisher of the module under the target data: ``F ≈ Z ⊗ diag(y)``, so a
    perturbation ΔW changes the predictions by the Fisher norm
    ``‖ΔW‖²_F = tr(diag(y+λ) ΔW Z ΔWᵀ)`` (``Z`` damped as in LoRA-DA). The
    second-order model of the loss is ``⟨G, ΔW⟩ + ½‖ΔW‖²_F``. Over rank-r
    updates it is minimized (Eckart–Young after the change of variables
    ``X = diag(y+λ)^{1/2} ΔW L``, ``Z = L Lᵀ``) by

        ``ΔW* = −diag(y+λ)^{-1/2} [M]_r L^{-1}``,  ``M = diag(y+λ)^{-1/2} G L^{-T}``

    where ``[M]_r`` keeps the r largest singular triplets of M: the LoRA
    directions are those of largest Fisher-weighted sensitivity ``σ_i(M)²``
    (each is the loss decrease ``½σ_i²`` its direction buys per the Fisher
    metric). The result does not depend on the choice of the factor L. The
    factors split ``ΔW*`` like LoRA-One, scaled like LoRA-DA (our choice):
    ``ΔW* = U' S' V'ᵀ``, ``B = U' √(S'/S'_1)/√γ``, ``A = √(S'/S'_1) V'ᵀ/√γ``, so
    ``B·A = ΔW*/(‖ΔW*‖₂ γ)``; base unchanged. Returns (A, B, σ(M)[:r], ‖ΔW*‖₂).
    """
    y_root = (output_factor_diag.to(torch.float64) + damping).rsqrt()  # diag(y+λ)^{-1/2}
    g = gradient.to(torch.float64)
    # M = Y^{-1/2} G L^{-T}: solve L Xᵀ = (Y^{-1/2} G)ᵀ
    m = torch.linalg.solve_triangular(cholesky, (y_root[:, None] * g).T, upper=False).T
    p, sig, q = _svd(m)
    if float(sig[0]) == 0.0:
        raise FloatingPointError("the gradient is exactly zero")
    left = y_root[:, None] * (p[:, :rank] * sig[:rank][None, :])  # d_out x r
    right = torch.linalg.solve_triangular(cholesky.T, q[:, :rank], upper=True)  # L^{-T} Q_r: d_in x r
    q1, r1 = torch.linalg.qr(left)
    q2, r2 = torch.linalg.qr(right)
    core_u, core_s, core_v = _svd(-(r1 @ r2.T))
    u_out, v_in = _signed_pairs(q1 @ core_u, q2 @ core_v)
    norm = float(core_s[0])
    root = (core_s / norm).sqrt() / math.sqrt(gamma)
    return root[:, None] * v_in.T, u_out * root[None, :], sig[:rank], norm


# -- the driver -----------------------------------------------------------------------


def _module_init(name: str, lora_A: torch.Tensor, lora_B: torch.Tensor, values: torch.Tensor, sigma: float,
                 damping: float = 0.0, input_group: Optional[Tuple[str, ...]] = None) -> "ModuleInit":
    from .result import ModuleInit

    lora_A = lora_A.to(torch.float32).contiguous()
    lora_B = lora_B.to(torch.float32).contiguous()
    if not (torch.isfinite(lora_A).all() and torch.isfinite(lora_B).all()):
        raise FloatingPointError(f"LoRA factors of module '{name}' are not finite")
    return ModuleInit(
        name=name,
        lora_A=lora_A,
        lora_B=lora_B,
        eigenvalues=values.detach().to(torch.float64).cpu(),
        sigma=float(sigma),
        variance_scale=0.0,
        damping=float(damping),
        input_group=input_group or (name,),
    )


def _collect(model: nn.Module, loader: Any, modules: Dict[str, nn.Module], config: "LoraDAConfig",
             forward_only: bool) -> "KFACStatistics":
    """The shared statistics pass (full, or forward-only), all-reduced under ``torch.distributed``."""
    import torch.distributed as dist

    from . import distributed
    from .statistics import collect_statistics, model_device

    run_distributed = distributed.is_active()
    path = config.stats_checkpoint
    if path is not None and run_distributed:
        path = f"{path}.rank{dist.get_rank()}"

    def statistics_pass() -> "KFACStatistics":
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
            stats_checkpoint=path,
            checkpoint_every=config.checkpoint_every,
            # the all-reduce expects G and y: a forward-only pass only on a single process
            forward_only=forward_only and not run_distributed,
        )

    if not run_distributed:
        return statistics_pass()
    stats = distributed.run_agreeing("the statistics pass", statistics_pass)
    distributed.synchronize_layout(stats, modules, model_device(model))
    distributed.all_reduce_statistics(stats)
    stats.check_totals()
    return stats


def initialize_method(model: nn.Module, loader: Any, config: "LoraDAConfig", modules: Dict[str, nn.Module]) -> "LoraInit":
    """Everything :func:`lora_da.initialize` does for a ``method`` other than ``"lora-da"``.

    Under ``torch.distributed`` every rank computes every module (the per-module
    work is one SVD or less); statistics are all-reduced first.
    """
    from .result import LoraInit

    method = config.method
    options = resolve_method_options(method, config.method_options)
    check_loader(method, loader)
    start = time.perf_counter()
    if method in WEIGHT_READING_METHODS:  # refuse quantized modules before any pass
        for name, module in modules.items():
            weight_matrix(name, module)
    if method in ("lora-ga",):
        for name, module in modules.items():
            d_in, d_out = linear_dims(module)
            if 2 * config.rank > min(d_in, d_out):
                raise ValueError(
                    f"lora-ga takes singular vectors r..2r of G: 2·rank={2 * config.rank} exceeds "
                    f"min(d_in, d_out)={min(d_in, d_out)} of module '{name}'"
                )

    stats = None
    # the phases of lora_da.api.PHASES; the SVD-style work of these methods counts as "solve"
    timings: Dict[str, float] = {"forward_backward": 0.0, "statistics_accumulate": 0.0, "factor_prep": 0.0}
    backends: Dict[str, str] = {}
    if method not in NO_DATA_METHODS:
        stats = _collect(model, loader, modules, config, forward_only=method in FORWARD_ONLY_METHODS)
        backends["statistics"] = stats.backend + ("" if stats.has_gradients else " (forward only)")
        timings["statistics_accumulate"] = stats.accumulate_seconds
    timings["forward_backward"] = max(time.perf_counter() - start - timings["statistics_accumulate"], 0.0)

    solve_start = time.perf_counter()
    result: Dict[str, "ModuleInit"] = {}
    generator = torch.Generator().manual_seed(config.seed)
    by_group: Dict[int, Any] = {}
    for name, module in modules.items():
        d_in, d_out = linear_dims(module)
        group = None
        if stats is not None:
            group = stats.groups[stats.modules[name].group_index].members
        if method == "lora":
            lora_A, lora_B = kaiming_lora_factors(d_in, d_out, config.rank, generator)
            result[name] = _module_init(name, lora_A, lora_B, torch.zeros(0), 0.0)
        elif method in ("pissa", "milora"):
            lora_A, lora_B, values = weight_svd_factors(weight_matrix(name, module), config.rank, minor=method == "milora")
            result[name] = _module_init(name, lora_A, lora_B, values, float(values.max()))
        elif method == "lora-ga":
            lora_A, lora_B, values = lora_ga_factors(stats.gradient(name), config.rank, options["stable_gamma"])
            result[name] = _module_init(name, lora_A, lora_B, values, float(values[0]), input_group=group)
        elif method == "lora-one":
            lora_A, lora_B, values = lora_one_factors(stats.gradient(name), config.rank, options["stable_gamma"])
            result[name] = _module_init(name, lora_A, lora_B, values, float(values[0]), input_group=group)
        elif method == "cntlora":
            lora_A, lora_B, values = cntlora_factors(
                weight_matrix(name, module), stats.input_factor(name), config.rank, options["energy"], options["shrinkage"]
            )
            result[name] = _module_init(name, lora_A, lora_B, values, float(values[0]), input_group=group)
        elif method == "fisher-subspace":
            from .method import prepare_input_factor

            index = stats.modules[name].group_index
            if index not in by_group:
                by_group[index] = prepare_input_factor(stats.input_factor(name), config.damping, name)
            factor = by_group[index]
            lora_A, lora_B, values, norm = fisher_subspace_factors(
                stats.gradient(name), factor.cholesky, stats.output_factor_diag(name), config.rank,
                config.damping, config.gamma,
            )
            result[name] = _module_init(name, lora_A, lora_B, values, norm, factor.damping, group)
        else:  # pragma: no cover - resolve_method_options guards this
            raise ValueError(method)
    timings["solve"] = time.perf_counter() - solve_start
    timings["total"] = time.perf_counter() - start
    backends["solve"] = f"{method} (torch.linalg, float64)"
    return LoraInit(
        modules=result,
        config=config,
        train_size=config.train_size or (stats.num_samples if stats is not None else 0),
        num_samples=stats.num_samples if stats is not None else 0,
        num_tokens=stats.num_tokens if stats is not None else 0,
        num_batches=stats.num_batches if stats is not None else 0,
        skipped_batches=stats.skipped_batches if stats is not None else 0,
        skipped_samples=stats.skipped_samples if stats is not None else 0,
        timings=timings,
        backends=backends,
        statistics_bytes=stats.nbytes() if stats is not None else 0,
    )
