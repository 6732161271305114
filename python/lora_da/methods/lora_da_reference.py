"""LoRA-DA's per-module math in float64 (docs/math.md, steps 1-7): the reference.

The batched fast path (:mod:`lora_da.methods.lora_da_batched`) computes the same
quantities for many modules at once; ``solver="eigh"`` runs these functions
module by module, and the tests hold the fast path to them.

Given a module's gradient ``G`` (d_out x d_in), its input factor ``Z`` and its
diagonal output factor ``y``:

1. ``Δ = −Z⁻¹ Gᵀ diag(1/(y+λ))``           natural-gradient step (d_in x d_out)
2. ``σ = σ_max(Δ)``, ``Δ̂ = Δ/σ``
3. ``c = Σ_i 1/(y_i+λ) / N / σ²``
4. ``Ω = −α Δ̂Δ̂ᵀ + β c Z⁻¹``                 Initialization Guidance Matrix
5. ``A₀`` = eigenvectors of Ω for its r smallest eigenvalues, signs fixed
6. ``B₀ = A₀ᵀ Δ̂``
7. ``lora_A = A₀ᵀ/√γ``, ``lora_B = B₀ᵀ/√γ``

Damping rule for ``Z`` (float64): the Cholesky factorization of ``Z_raw + λ_k I``
is tried with ``λ_0 = λ`` and then ``λ_k = max(λ, 1e-12·tr(Z_raw)/d_in)·10^k``,
k = 1, …, 8; the first that succeeds is used (recorded per module in
``ModuleInit.damping``). The scale-aware floor makes a tiny user λ escalate to
something a rank-deficient ``Z`` (dead features, fewer tokens than d_in) can
bear. ``y`` is always damped with the original λ (docs/math.md §5.1).

The escalations are not warned about one by one: each solve collects them
(:func:`damping_escalations`) and hands them to :func:`report_damping_escalations`,
which gives one :class:`~lora_da.user_warnings.DampingWarning` per solve, or one
per :class:`one_damping_summary` block around several solves (one per
``initialize`` call, however many passes).
"""

from __future__ import annotations

import contextvars
import math
from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from ..module_init import ModuleInit, make_module_init
from ..solvers import fix_column_signs, smallest_eigenpairs
from ..user_warnings import DampingWarning, warn_user

MAX_DAMPING_ESCALATIONS = 8


@dataclass
class InputFactor:
    """``Z = Z_raw + λ_used I`` of one input group, prepared once for all members."""

    matrix: Optional[torch.Tensor]  # Z itself (float64, symmetric, damped); None once the fast path consumed it
    cholesky: torch.Tensor  # lower-triangular L with Z = L Lᵀ (float64)
    damping: float  # λ actually added to the diagonal
    _inverse: Optional[torch.Tensor] = None

    @property
    def inverse(self) -> torch.Tensor:
        """Z⁻¹ (float64, symmetric), formed on first use (only the dense path needs it)."""
        if self._inverse is None:
            self._inverse = torch.cholesky_inverse(self.cholesky)
        return self._inverse


def prepare_input_factor(input_factor_raw: torch.Tensor, damping: float, name: str) -> InputFactor:
    """Cholesky-factor ``Z_raw + λI`` in float64, escalating λ by the module's rule
    (``InputFactor.damping`` is the λ used; no warning here, see :func:`report_damping_escalations`).
    ``name``: a module of the group, for the error when even the last step fails."""
    z_raw = input_factor_raw.to(torch.float64)
    z_raw = 0.5 * (z_raw + z_raw.T)
    eye = torch.eye(z_raw.shape[0], dtype=torch.float64, device=z_raw.device)
    floor = max(damping, 1e-12 * float(torch.diagonal(z_raw).mean()))
    for k in range(MAX_DAMPING_ESCALATIONS + 1):
        used = damping if k == 0 else floor * 10.0**k
        damped = z_raw + used * eye
        cholesky, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0 and torch.isfinite(cholesky).all():
            return InputFactor(matrix=damped, cholesky=cholesky, damping=used)
    raise FloatingPointError(
        f"input factor Z of module '{name}' is not positive definite even with damping "
        f"{used:g} (is it NaN, or far from symmetric positive semi-definite?)"
    )


@dataclass(frozen=True)
class DampingEscalation:
    """One input group whose ``Z`` needed more damping than asked for (docs/math.md §5.1)."""

    members: Tuple[str, ...]  # the modules sharing this Z (all get the damping used)
    requested: float  # the user's λ
    used: float  # the λ the escalation rule settled on
    d_in: int
    num_tokens: int  # |T|: the tokens Z was summed over

    @property
    def factor(self) -> float:
        """How many times the requested damping was used."""
        return self.used / self.requested

    @property
    def rank_deficient(self) -> bool:
        """``|T| < d_in``: Z is a sum of fewer rank-one terms than its size, so singular."""
        return self.num_tokens < self.d_in


def damping_escalations(
    factors: Dict[int, InputFactor],
    members: Dict[int, Tuple[str, ...]],
    requested: float,
    num_tokens: Union[int, Mapping[int, int]],
) -> List[DampingEscalation]:
    """The groups of ``factors`` (``{group: InputFactor}``, ``members``: their modules)
    whose damping was raised above ``requested``; ``num_tokens``: each group's ``|T|``
    (``{group: count}``, e.g. :meth:`KFACStatistics.group_tokens`) or one count for all."""
    return [
        DampingEscalation(
            members=tuple(members[group]),
            requested=float(requested),
            used=float(factor.damping),
            d_in=int(factor.cholesky.shape[-1]),
            num_tokens=int(num_tokens[group] if isinstance(num_tokens, Mapping) else num_tokens),
        )
        for group, factor in factors.items()
        if factor.damping > requested
    ]


def damping_summary(escalations: Sequence[DampingEscalation]) -> Optional[str]:
    """One line about ``escalations`` (``None`` when there are none): how many modules
    needed more damping, the largest factor and its module, why, and what to do."""
    if not escalations:
        return None
    modules = sum(len(e.members) for e in escalations)
    worst = max(escalations, key=lambda e: e.factor)
    requested = sorted({e.requested for e in escalations})
    asked = f"damping={requested[0]:g}" if len(requested) == 1 else "the damping given"
    short = [e for e in escalations if e.rank_deficient]
    reasons = []
    if short:
        dims = sorted({e.d_in for e in short})
        tokens = sorted({e.num_tokens for e in short})
        reasons.append(
            f"fewer tokens than d_in for {sum(len(e.members) for e in short)} of them "
            f"({'/'.join(str(t) for t in tokens)} calibration tokens < d_in "
            f"{dims[0] if len(dims) == 1 else f'{dims[0]}..{dims[-1]}'}: Z is rank-deficient, |T| < d_in)"
        )
    if len(short) < len(escalations):
        rest = sum(len(e.members) for e in escalations if not e.rank_deficient)
        reasons.append(f"ill-conditioning for {rest} of them (tiny eigenvalues of Z, e.g. rounding or dead input features)")
    sharing = f", shared with {len(worst.members) - 1} more" if len(worst.members) > 1 else ""
    return (
        f"{modules} module{'s' if modules != 1 else ''} ({len(escalations)} input group"
        f"{'s' if len(escalations) != 1 else ''}) needed more damping than {asked} to make Z positive definite: "
        f"up to {worst.factor:.3g}x (damping {worst.used:g}) for '{worst.members[0]}'{sharing}; "
        f"why: {' and '.join(reasons)}. Use more calibration tokens or a larger damping= "
        "(per module: ModuleInit.damping, 'damping_escalations' in lora_da_report.json; docs/math.md §5.1)"
    )


# The escalations of the solves inside a one_damping_summary block (None: no block open).
_PENDING: contextvars.ContextVar[Optional[List[DampingEscalation]]] = contextvars.ContextVar(
    "lora_da_damping_escalations", default=None
)


def report_damping_escalations(escalations: Iterable[DampingEscalation]) -> None:
    """Warn once about a solve's escalations (a :class:`DampingWarning` at the user's
    line), or keep them for the enclosing :class:`one_damping_summary` block."""
    escalations = list(escalations)
    pending = _PENDING.get()
    if pending is not None:
        pending.extend(escalations)
        return
    message = damping_summary(escalations)
    if message is not None:
        warn_user(message, DampingWarning)


class one_damping_summary:  # noqa: N801 - used like a function: ``with one_damping_summary():``
    """``with one_damping_summary(): ...`` — the damping escalations of every solve in
    the block give one warning, when the block ends without an exception (the
    driver wraps a whole ``initialize`` call: one warning however many passes). A
    block inside another adds to the outer one. A class, not a generator, so that
    the warning's stack level reaches the caller's line."""

    def __enter__(self) -> "one_damping_summary":
        self._token = _PENDING.set([]) if _PENDING.get() is None else None
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if self._token is None:
            return
        escalations = _PENDING.get() or []
        _PENDING.reset(self._token)
        if exc_type is None:
            report_damping_escalations(escalations)


def natural_gradient_step(
    gradient: torch.Tensor, input_factor: InputFactor, output_factor_diag: torch.Tensor, damping: float
) -> torch.Tensor:
    """``Δ = −Z⁻¹ Gᵀ diag(1/(y+λ))`` (d_in x d_out), with Z⁻¹ applied by Cholesky solves."""
    g_t = gradient.to(torch.float64).T
    solved = torch.cholesky_solve(g_t, input_factor.cholesky)
    return -solved / (output_factor_diag.to(torch.float64) + damping).unsqueeze(0)


def spectral_norm(matrix: torch.Tensor) -> float:
    """``σ_max`` from the smaller Gram matrix (float64)."""
    gram = matrix.T @ matrix if matrix.shape[1] <= matrix.shape[0] else matrix @ matrix.T
    return math.sqrt(max(float(torch.linalg.eigvalsh(gram)[-1]), 0.0))


def guidance_matrix(
    delta_hat: torch.Tensor, input_factor_inverse: torch.Tensor, alpha: float, beta: float, variance_scale: float
) -> torch.Tensor:
    """``Ω = −α Δ̂Δ̂ᵀ + β c Z⁻¹`` (d_in x d_in, symmetrized)."""
    omega = -alpha * (delta_hat @ delta_hat.T) + (beta * variance_scale) * input_factor_inverse
    return 0.5 * (omega + omega.T)


@dataclass
class PreparedModule:
    """Steps 1-3 of one module: what its eigenproblem (steps 4-5) needs."""

    delta_hat: torch.Tensor  # Δ̂ = Δ/σ (d_in x d_out, float64)
    sigma: float  # σ_max(Δ)
    variance_scale: float  # c


def prepare_module(
    name: str,
    gradient: torch.Tensor,
    input_factor: InputFactor,
    output_factor_diag: torch.Tensor,
    *,
    damping: float,
    train_size: int,
) -> PreparedModule:
    """Steps 1-3 (float64): Δ, σ, Δ̂ and c."""
    delta = natural_gradient_step(gradient, input_factor, output_factor_diag, damping)
    sigma = spectral_norm(delta)
    if not math.isfinite(sigma):
        raise FloatingPointError(f"natural-gradient step of module '{name}' is not finite")
    if sigma == 0.0:
        raise FloatingPointError(
            f"the gradient of module '{name}' is exactly zero: its loss does not depend on the module's weight"
        )
    delta_hat = delta / sigma
    variance_scale = float((1.0 / (output_factor_diag.to(torch.float64) + damping)).sum()) / train_size / sigma**2
    return PreparedModule(delta_hat=delta_hat, sigma=sigma, variance_scale=variance_scale)


@dataclass
class ModuleSubspace:
    """Steps 5-6 in float64, before the γ scaling and the float32 cast."""

    input_basis: torch.Tensor  # A₀, d_in x r, orthonormal columns, signs fixed
    output_basis: torch.Tensor  # B₀ = A₀ᵀ Δ̂, r x d_out
    eigenvalues: torch.Tensor  # r smallest eigenvalues of Ω, ascending
    sigma: float  # σ_max(Δ)
    variance_scale: float  # c


def subspace_from_eigenpairs(
    prepared: PreparedModule, eigenvalues: torch.Tensor, vectors: torch.Tensor
) -> ModuleSubspace:
    """Steps 5-6: sign-fixed A₀ from Ω's r smallest eigenvectors, and B₀ = A₀ᵀΔ̂."""
    input_basis = fix_column_signs(vectors.to(torch.float64))
    return ModuleSubspace(
        input_basis=input_basis,
        output_basis=input_basis.T @ prepared.delta_hat,
        eigenvalues=eigenvalues.to(torch.float64),
        sigma=prepared.sigma,
        variance_scale=prepared.variance_scale,
    )


def finish_module(
    name: str,
    prepared: PreparedModule,
    eigenvalues: torch.Tensor,
    vectors: torch.Tensor,
    *,
    gamma: float,
    damping: float,
    input_group: Tuple[str, ...],
) -> ModuleInit:
    """Steps 5-7 from the r smallest eigenpairs of Ω; factors in float32.
    ``damping``: the λ used for Z (reported); ``input_group``: the modules sharing Z."""
    subspace = subspace_from_eigenpairs(prepared, eigenvalues, vectors)
    scale = 1.0 / math.sqrt(gamma)
    return make_module_init(
        name,
        subspace.input_basis.T * scale,
        subspace.output_basis.T * scale,
        subspace.eigenvalues,
        subspace.sigma,
        variance_scale=subspace.variance_scale,
        damping=damping,
        input_group=input_group,
    )


def dense_eigenpairs(
    prepared: PreparedModule, input_factor: InputFactor, *, rank: int, alpha: float, beta: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Steps 4-5 with the dense oracle: Ω formed explicitly, ``torch.linalg.eigh`` in float64."""
    omega = guidance_matrix(prepared.delta_hat, input_factor.inverse, alpha, beta, prepared.variance_scale)
    return smallest_eigenpairs(omega, rank)
