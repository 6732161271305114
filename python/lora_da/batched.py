"""Steps 1-3 of SPEC.md and the preconditioners, batched over same-shape problems.

The per-module functions of :mod:`lora_da.method` are the reference; this module
computes the same quantities for many modules at once (one float64 stack per
shape, batched Cholesky / triangular solves / matrix products) so that the
fast path spends its time in large BLAS/LAPACK calls, not in Python or in
hundreds of small ones:

* :func:`prepare_input_factors` — ``Z = Z_raw + λI`` and its Cholesky factor per
  input group; a group whose factorization fails falls back to
  :func:`lora_da.method.prepare_input_factor` (the damping escalation rule).
* :func:`prepare_modules` — ``Δ``, ``σ = σ_max(Δ)``, ``Δ̂`` and ``c`` per module.
* :func:`spectral_norms` — ``σ_max`` by block subspace iteration, without the
  Gram matrix's eigendecomposition.
* :func:`guidance_preconditioners` — ``P = (βcZ⁻¹ + αI)⁻¹`` per input group.
"""

from __future__ import annotations

import math
from typing import Dict, List, Sequence, Tuple

import torch

from .method import InputFactor, PreparedModule, prepare_input_factor

SUBSPACE_BLOCK = 8  # block size of the subspace iteration for σ_max
SUBSPACE_MAX_ITER = 60
SUBSPACE_TOL = 1e-9  # relative residual of the top Ritz pair of ΔᵀΔ: σ² then has error ≲ tol²·σ²·(σ₁²/gap)
DENSE_BELOW = 64  # smaller matrices: σ from the Gram matrix's eigvalsh


def _stack_float64(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    first = tensors[0]
    out = torch.empty((len(tensors), *first.shape), dtype=torch.float64, device=first.device)
    for index, tensor in enumerate(tensors):
        out[index].copy_(tensor)
    return out


def prepare_input_factors(
    raw: Dict[int, torch.Tensor], names: Dict[int, str], damping: float
) -> Dict[int, InputFactor]:
    """``{group: InputFactor}`` from ``{group: Z_raw}`` (``names``: a member per group, for messages).

    Groups of equal ``d_in`` are symmetrized, damped and factored in one batched
    float64 Cholesky; the ones that fail are redone one by one with the
    escalation rule of :func:`lora_da.method.prepare_input_factor` (and its warning).
    """
    by_dim: Dict[int, List[int]] = {}
    for group, matrix in raw.items():
        by_dim.setdefault(matrix.shape[-1], []).append(group)
    factors: Dict[int, InputFactor] = {}
    for groups in by_dim.values():
        z = _stack_float64([raw[g] for g in groups])
        z = 0.5 * (z + z.transpose(-1, -2))
        z.diagonal(dim1=-2, dim2=-1).add_(damping)
        cholesky, info = torch.linalg.cholesky_ex(z)
        good = (info == 0) & torch.isfinite(cholesky).all(dim=-1).all(dim=-1)
        for index, group in enumerate(groups):
            if bool(good[index]):
                factors[group] = InputFactor(matrix=z[index], cholesky=cholesky[index], damping=damping)
            else:
                factors[group] = prepare_input_factor(raw[group], damping, names[group])
    return factors


def spectral_norms(matrices: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """``σ_max`` of each matrix of ``(B, m, n)`` (float64), by block subspace
    iteration on ``ΔᵀΔ`` with a Rayleigh–Ritz step and a residual test.

    Stops when the top Ritz pair ``(θ, u)`` of ``ΔᵀΔ`` has ``‖ΔᵀΔu − θu‖ ≤ tol·θ``
    (then θ's relative error is about ``tol²·θ/gap``); problems that have not
    converged after ``SUBSPACE_MAX_ITER`` iterations, and small matrices, use
    the dense eigenvalues of the Gram matrix instead.
    """
    a = matrices.to(torch.float64)
    if a.shape[-1] > a.shape[-2]:
        a = a.transpose(-1, -2)  # (B, m, n) with n <= m: iterate in the smaller space
    a = a.contiguous()
    a_t = a.transpose(-1, -2).contiguous()  # both orders, so that every product streams memory in order
    batch, _, n = a.shape
    if n <= max(DENSE_BELOW, 4 * SUBSPACE_BLOCK):
        gram = a.transpose(-1, -2) @ a
        return torch.linalg.eigvalsh(gram)[..., -1].clamp(min=0).sqrt()
    generator = torch.Generator(device="cpu").manual_seed(seed)
    basis = torch.randn(batch, n, SUBSPACE_BLOCK, generator=generator, dtype=torch.float64).to(a.device)
    basis = torch.linalg.qr(basis).Q
    values = torch.zeros(batch, dtype=torch.float64, device=a.device)
    done = torch.zeros(batch, dtype=torch.bool, device=a.device)
    for _ in range(SUBSPACE_MAX_ITER):
        image = a @ basis  # (B, m, b)
        small = image.transpose(-1, -2) @ image  # Rayleigh quotient of ΔᵀΔ on the basis
        theta, coefficients = torch.linalg.eigh(small)
        top, top_vector = theta[:, -1], coefficients[:, :, -1:]
        # residual of the top Ritz pair: ΔᵀΔ u − θ u, u = basis · top_vector
        u = basis @ top_vector
        back = a_t @ image  # ΔᵀΔ basis
        residual = back @ top_vector - top.view(-1, 1, 1) * u
        converged = residual.norm(dim=(-2, -1)) <= SUBSPACE_TOL * top.abs()
        values = torch.where(done, values, top)
        done = done | converged
        if bool(done.all()):
            break
        basis = torch.linalg.qr(back).Q  # one step of subspace iteration
    if not bool(done.all()):
        rest = (~done).nonzero().flatten()
        gram = a_t[rest] @ a[rest]
        values[rest] = torch.linalg.eigvalsh(gram)[..., -1]
    return values.clamp(min=0).sqrt()


def prepare_modules(
    names: Sequence[str],
    gradients: Dict[str, torch.Tensor],
    output_factor_diags: Dict[str, torch.Tensor],
    input_factors: Dict[str, InputFactor],
    *,
    damping: float,
    train_size: int,
    gradient_scale: float = 1.0,
    seed: int = 0,
) -> Dict[str, PreparedModule]:
    """Steps 1-3 (float64) for every module, batched over modules of one ``(d_in, d_out)``:
    ``Δ = −Z⁻¹ Gᵀ diag(1/(y+λ))``, ``σ = σ_max(Δ)``, ``Δ̂ = Δ/σ``, ``c = Σ 1/(y+λ) / N / σ²``,
    with ``G = gradient_scale · gradients[name]``."""
    by_shape: Dict[Tuple[int, int], List[str]] = {}
    for name in names:
        by_shape.setdefault(tuple(gradients[name].shape), []).append(name)
    prepared: Dict[str, PreparedModule] = {}
    for same_shape in by_shape.values():
        g_t = _stack_float64([gradients[name].T for name in same_shape])  # (B, d_in, d_out)
        cholesky = torch.stack([input_factors[name].cholesky for name in same_shape])
        inverse_output = 1.0 / (_stack_float64([output_factor_diags[name] for name in same_shape]) + damping)
        delta = torch.cholesky_solve(g_t, cholesky)
        del g_t, cholesky
        delta.mul_(inverse_output.unsqueeze(-2)).mul_(-gradient_scale)
        sigmas = spectral_norms(delta, seed=seed).tolist()
        for index, name in enumerate(same_shape):
            sigma = sigmas[index]
            if not math.isfinite(sigma):
                raise FloatingPointError(f"natural-gradient step of module '{name}' is not finite")
            if sigma == 0.0:
                raise FloatingPointError(
                    f"the gradient of module '{name}' is exactly zero: its loss does not depend on the module's weight"
                )
            variance_scale = float(inverse_output[index].sum()) / train_size / sigma**2
            prepared[name] = PreparedModule(
                delta_hat=delta[index].div_(sigma), sigma=sigma, variance_scale=variance_scale
            )
    return prepared


def guidance_preconditioners(
    input_factors: Dict[int, InputFactor], variance_scales: Dict[int, float], alpha: float
) -> Dict[int, torch.Tensor]:
    """Per group, the lower Cholesky factor of ``M = βcI + αZ`` (``variance_scales``:
    βc per group; α > 0), batched per ``d_in``: the factored form of the
    preconditioner ``P = (βcZ⁻¹ + αI)⁻¹ = (I − βc M⁻¹)/α`` (see
    :func:`lora_da.solvers.guidance_preconditioner`; ``n³/3`` flops, ``P`` is never formed)."""
    by_dim: Dict[int, List[int]] = {}
    for group, factor in input_factors.items():
        by_dim.setdefault(factor.matrix.shape[-1], []).append(group)
    result: Dict[int, torch.Tensor] = {}
    for groups in by_dim.values():
        shifted = torch.stack([input_factors[g].matrix for g in groups]).mul_(alpha)  # stack copies
        scale = torch.tensor([variance_scales[g] for g in groups], dtype=torch.float64, device=shifted.device)
        shifted.diagonal(dim1=-2, dim2=-1).add_(scale.view(-1, 1))
        factor = torch.linalg.cholesky(shifted)
        for index, group in enumerate(groups):
            result[group] = factor[index]
    return result
