"""LoRA-DA's steps 1-3 and the preconditioners (docs/math.md §3, §5.1-§5.3), batched over same-shape problems.

The per-module functions of :mod:`lora_da.methods.lora_da_reference` are the reference; this module
computes the same quantities for many modules at once (one float64 stack per
shape, batched Cholesky / triangular solves / matrix products) so that the
fast path spends its time in large BLAS/LAPACK calls, not in Python or in
hundreds of small ones:

* :func:`prepare_input_factors` — ``Z = Z_raw + λI`` and its Cholesky factor per
  input group; a group whose factorization fails falls back to
  :func:`lora_da.methods.lora_da_reference.prepare_input_factor` (the damping escalation rule).
* :func:`solve_batches` — the modules grouped by shape and kind: one batch per
  solver call, used by both the preparation and the solve.
* :func:`prepare_modules` — ``Δ``, ``σ = σ_max(Δ)``, ``Δ̂`` and ``c`` per module.
* :func:`spectral_norms_and_directions` — ``σ_max`` by block subspace iteration
  (docs/math.md §5.2), without the Gram matrix's eigendecomposition.
* :func:`guidance_preconditioners` — ``P = (βcZ⁻¹ + αI)⁻¹`` per input group (§5.3).
* :func:`stack_views` — equally spaced matrices of one storage as a strided view.
"""

from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from .. import host_linalg
from ..naming import module_kind
from .lora_da_reference import InputFactor, PreparedModule, prepare_input_factor

SUBSPACE_BLOCK = 8  # block size of the subspace iteration for σ_max
SUBSPACE_MAX_ITER = 60
SUBSPACE_TOL = 1e-5  # float32 iterations: relative residual of the top Ritz pair of ΔᵀΔ (near float32's floor)
DENSE_BELOW = 64  # smaller matrices: σ from the Gram matrix's eigvalsh


def _stack_float64(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    first = tensors[0]
    out = torch.empty((len(tensors), *first.shape), dtype=torch.float64, device=first.device)
    for index, tensor in enumerate(tensors):
        out[index].copy_(tensor)
    return out


def solve_batches(shapes: Dict[str, Tuple[int, int]]) -> List[List[str]]:
    """The modules (``{name: (d_out, d_in)}``, in order) grouped by shape and kind
    (``layers.*.q_proj``, :func:`lora_da.naming.module_kind`): one batch per solver
    call. A kind's Z factors and preconditioners then sit equally spaced in the
    per-``d_in`` stacks, so that :func:`stack_views` passes them without copies."""
    batches: Dict[Tuple[Tuple[int, int], str], List[str]] = {}
    for name, shape in shapes.items():
        batches.setdefault((tuple(shape), module_kind(name)), []).append(name)
    return list(batches.values())


def stack_views(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``torch.stack(tensors)`` — as a strided view, without copying, when the
    tensors are equally spaced slices of one storage with one layout (e.g.
    every third factor of a batched Cholesky). Read-only use: a view may repeat
    a matrix (spacing 0). Large float64 stacks cost more in fresh memory than in
    arithmetic on small machines, so the fast path avoids them."""
    first = tensors[0]
    storage = first.untyped_storage().data_ptr()
    if all(
        t.shape == first.shape and t.stride() == first.stride() and t.dtype == first.dtype
        and t.device == first.device and t.untyped_storage().data_ptr() == storage
        for t in tensors
    ):
        offsets = [t.storage_offset() for t in tensors]
        step = offsets[1] - offsets[0] if len(offsets) > 1 else first.numel()
        if step >= 0 and all(b - a == step for a, b in zip(offsets, offsets[1:])):
            return first.as_strided((len(tensors), *first.shape), (step, *first.stride()), first.storage_offset())
    return torch.stack(tensors)


def prepare_input_factors(
    raw: Dict[int, torch.Tensor],
    names: Dict[int, str],
    damping: float,
    scale: Union[float, Mapping[int, float]] = 1.0,
) -> Dict[int, InputFactor]:
    """``{group: InputFactor}`` from ``{group: Z_raw}``, where ``Z_raw = scale · raw[group]``
    (``raw`` may be the unnormalized sums: scaled in the float64 stack, no extra copy;
    ``scale``: one for all or ``{group: scale}``, e.g. ``1/|T_group|``;
    ``names``: a member per group, for messages).

    Groups of equal ``d_in`` are damped and factored in one batched
    float64 Cholesky; the ones that fail are redone one by one with the
    escalation rule of :func:`lora_da.methods.lora_da_reference.prepare_input_factor` (the caller
    reports the escalations: ``InputFactor.damping`` is the λ used).
    """
    by_dim: Dict[int, List[int]] = {}
    for group, matrix in raw.items():
        by_dim.setdefault(matrix.shape[-1], []).append(group)
    factors: Dict[int, InputFactor] = {}
    for groups in by_dim.values():
        # No symmetrization pass (two full temporaries): the statistics backends return Z
        # exactly symmetric (mirrored triangles), and the factorization reads one triangle.
        z = _stack_float64([raw[g] for g in groups])
        scales = [float(scale[g]) if isinstance(scale, Mapping) else float(scale) for g in groups]
        if any(s != 1.0 for s in scales):
            z.mul_(torch.tensor(scales, dtype=z.dtype, device=z.device).view(-1, 1, 1))
        z.diagonal(dim1=-2, dim2=-1).add_(damping)
        cholesky, info = host_linalg.cholesky_lower(z)  # row-major L (what the solver reads); z is kept
        # a NaN/Inf anywhere in row i of the triangle read reaches L[i, i] = √(z_ii − Σ_k L[i, k]²):
        # checking L's diagonal suffices
        good = (info == 0) & torch.isfinite(torch.diagonal(cholesky, dim1=-2, dim2=-1)).all(dim=-1)
        for index, group in enumerate(groups):
            if bool(good[index]):
                factors[group] = InputFactor(matrix=z[index], cholesky=cholesky[index], damping=damping)
            else:
                factors[group] = prepare_input_factor(raw[group].to(torch.float64) * scales[index], damping, names[group])
    return factors


def spectral_norms_and_directions(
    matrices: torch.Tensor, seed: int = 0
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``σ_max`` of each matrix of ``(B, m, n)`` (float64), and an orthonormal
    float32 basis ``(B, m, SUBSPACE_BLOCK)`` that approximates the top left
    singular subspace (``None`` for small matrices): the subspace iteration's
    last block, a good start for eigensolvers whose answer lies near it.

    Block subspace iteration on ``ΔᵀΔ`` (``ΔΔᵀ`` for wide Δ) in float32 (half the memory traffic of
    float64; each iteration streams Δ twice), stopped when the top Ritz pair
    ``(θ, u)`` has ``‖ΔᵀΔu − θu‖ ≤ tol·θ``; then one Rayleigh–Ritz step in
    float64 on the final basis. The float64 Rayleigh quotient of a basis whose
    top direction is accurate to ``tol`` has relative error about
    ``tol²·θ/gap`` (≈1e-10 for tol=1e-5 and a 0.1% gap), far below the float32
    rounding of the LoRA factors that σ scales. Problems that do not converge
    in ``SUBSPACE_MAX_ITER`` iterations, and small matrices, use the float64
    eigenvalues of the Gram matrix instead.
    """
    a = matrices.to(torch.float64)
    transposed = not a.is_contiguous() and a.mT.is_contiguous()
    if transposed:
        a = a.mT  # σ(Δᵀ) = σ(Δ): read a column-major batch in its own order
    batch, rows, cols = a.shape
    wide = cols > rows  # iterate in the smaller space: on ΔΔᵀ for wide Δ, on ΔᵀΔ for tall Δ
    n = min(rows, cols)

    def largest_gram_eigenvalue(matrix: torch.Tensor) -> torch.Tensor:
        """Dense float64 fallback: the top eigenvalue of the (smaller) Gram matrix."""
        gram = matrix @ matrix.transpose(-1, -2) if wide else matrix.transpose(-1, -2) @ matrix
        return torch.linalg.eigvalsh(gram)[..., -1]

    if n <= max(DENSE_BELOW, 4 * SUBSPACE_BLOCK):
        return largest_gram_eigenvalue(a).clamp(min=0).sqrt(), None

    def image_of(matrix: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        """Δᵀv (wide) or Δv (tall); either way Δ is read in memory order."""
        return (vectors.transpose(-1, -2) @ matrix).transpose(-1, -2) if wide else matrix @ vectors

    def back_of(matrix: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        return matrix @ image if wide else (image.transpose(-1, -2) @ matrix).transpose(-1, -2)

    low = a.to(torch.float32).contiguous()  # one float32 copy
    generator = torch.Generator(device="cpu").manual_seed(seed)
    basis = torch.randn(batch, n, SUBSPACE_BLOCK, generator=generator, dtype=torch.float32).to(a.device)
    basis = torch.linalg.qr(basis).Q
    done = torch.zeros(batch, dtype=torch.bool, device=a.device)
    final_basis = basis.clone()
    for _ in range(SUBSPACE_MAX_ITER):
        image = image_of(low, basis)
        small = image.transpose(-1, -2) @ image  # Rayleigh quotient of the Gram matrix on the basis
        theta, coefficients = torch.linalg.eigh(small)
        top, top_vector = theta[:, -1], coefficients[:, :, -1:]
        back = back_of(low, image)  # Gram matrix times basis
        residual = back @ top_vector - top.view(-1, 1, 1) * (basis @ top_vector)
        converged = (residual.norm(dim=(-2, -1)) <= SUBSPACE_TOL * top.abs()) & ~done
        final_basis[converged] = basis[converged]
        done = done | converged
        if bool(done.all()):
            break
        basis = torch.linalg.qr(back).Q  # one step of subspace iteration
    values = torch.empty(batch, dtype=torch.float64, device=a.device)
    good = done.nonzero().flatten()
    if good.numel():  # float64 Rayleigh–Ritz on the converged float32 bases
        everyone = good.numel() == batch  # the usual case: no indexing copy of Δ
        basis64 = torch.linalg.qr((final_basis if everyone else final_basis[good]).to(torch.float64)).Q
        image64 = image_of(a if everyone else a[good], basis64)
        values[good] = torch.linalg.eigvalsh(image64.transpose(-1, -2) @ image64)[..., -1]
    rest = (~done).nonzero().flatten()
    if rest.numel():
        values[rest] = largest_gram_eigenvalue(a[rest])
    # the block in the row space of the original matrices: the iterated space itself
    # or its image, whichever is the row space of `a` (the column space if transposed)
    basis_in_row_space = wide != transposed
    directions = final_basis if basis_in_row_space else torch.linalg.qr(image_of(low, final_basis)).Q
    return values.clamp(min=0).sqrt(), directions


def prepare_modules(
    batches: Sequence[Sequence[str]],
    gradients: Dict[str, torch.Tensor],
    output_factor_diags: Dict[str, torch.Tensor],
    input_factors: Dict[str, InputFactor],
    *,
    damping: float,
    train_size: int,
    gradient_scale: float = 1.0,
    seed: int = 0,
    start_blocks: Optional[Dict[str, torch.Tensor]] = None,
) -> Dict[str, PreparedModule]:
    """Steps 1-3 (float64) for every module, one batch of :func:`solve_batches` at a time:
    ``Δ = −Z⁻¹ Gᵀ diag(1/(y+λ))``, ``σ = σ_max(Δ)``, ``Δ̂ = Δ/σ``, ``c = Σ 1/(y+λ) / N / σ²``,
    with ``G = gradient_scale · gradients[name]``. When ``start_blocks`` is given, it
    receives per module an orthonormal ``(d_in, SUBSPACE_BLOCK)`` float32 block near
    Δ̂'s top left singular subspace (a by-product of σ's subspace iteration), where
    LoRA-DA's eigenvectors lie when the bias term dominates: a start for the solver."""
    prepared: Dict[str, PreparedModule] = {}
    for same_shape in batches:
        # G stacked as it is stored (B, d_out, d_in): its transpose Gᵀ is then a column-major view,
        # which is the layout LAPACK solves in, so neither this copy nor the solver's own one transposes
        gradient = _stack_float64([gradients[name] for name in same_shape])
        cholesky = stack_views([input_factors[name].cholesky for name in same_shape])
        inverse_output = 1.0 / (_stack_float64([output_factor_diags[name] for name in same_shape]) + damping)
        host_linalg.cholesky_solve_(gradient, cholesky)  # in place: gradient.mT becomes Z⁻¹Gᵀ
        delta = gradient.mT  # (B, d_in, d_out), column-major
        del gradient, cholesky
        delta.mul_(inverse_output.unsqueeze(-2)).mul_(-gradient_scale)
        sigma_values, directions = spectral_norms_and_directions(delta, seed=seed)
        sigmas = sigma_values.tolist()
        if start_blocks is not None and directions is not None:
            start_blocks.update({name: directions[index] for index, name in enumerate(same_shape)})
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
    input_factors: Dict[int, InputFactor],
    variance_scales: Dict[int, float],
    alpha: float,
    *,
    overwrite_matrices: bool = False,
) -> Dict[int, torch.Tensor]:
    """Per group, the lower Cholesky factor of ``M = βcI + αZ`` (``variance_scales``:
    βc per group; α > 0), batched per ``d_in``: the factored form of the
    preconditioner ``P = (βcZ⁻¹ + αI)⁻¹ = (I − βc M⁻¹)/α`` (docs/math.md §5.3;
    ``n³/3`` flops, ``P`` is never formed).

    ``overwrite_matrices=True`` builds M in the storage of the groups' ``Z``
    (``InputFactor.matrix``, then set to ``None``) instead of a fresh copy: the
    fast path needs only the Cholesky factors of Z after this step.
    """
    by_dim: Dict[int, List[int]] = {}
    for group, factor in input_factors.items():
        if factor.matrix is None:
            raise ValueError(f"the matrix Z of input group {group} was already overwritten")
        by_dim.setdefault(factor.matrix.shape[-1], []).append(group)
    result: Dict[int, torch.Tensor] = {}
    for groups in by_dim.values():
        matrices = [input_factors[g].matrix for g in groups]
        shifted = stack_views(matrices) if overwrite_matrices else torch.stack(matrices)
        shifted.mul_(alpha)
        scale = torch.tensor([variance_scales[g] for g in groups], dtype=torch.float64, device=shifted.device)
        shifted.diagonal(dim1=-2, dim2=-1).add_(scale.view(-1, 1))
        if overwrite_matrices:  # M's storage is Z's, which is not needed again: factored in place
            factor, info = shifted, host_linalg.cholesky_lower_(shifted)
        else:
            factor, info = host_linalg.cholesky_lower(shifted)
        failed = (info != 0).nonzero().flatten().tolist()
        if failed:  # βcI + αZ is positive definite whenever Z is: only numerical trouble gets here
            raise FloatingPointError(
                f"the preconditioner matrix βcI + αZ of input group {groups[failed[0]]} is not positive definite "
                f"(LAPACK info {int(info[failed[0]])})"
            )
        for index, group in enumerate(groups):
            result[group] = factor[index]
            if overwrite_matrices:
                input_factors[group].matrix = None
    return result
