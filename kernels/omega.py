"""Batched Initialization Guidance Matrices Ω: plain-PyTorch reference.

For a batch of ``B`` modules of the same shape (docs/math.md step 4, with the σ
normalization of step 2 folded in):

    Ω_b = −(α/σ_b²) Δ_b Δ_bᵀ + w_b · ½(Z⁻¹_b + Z⁻¹_bᵀ)

with ``Δ_b`` the un-normalized natural-gradient step (``d_in x d_out``), ``σ_b``
its largest singular value (so ``Δ_b/σ_b = Δ̂_b``) and ``w_b = β c_b`` the weight of
the variance term. The result is exactly symmetric. This is the oracle of
``omega_triton.guidance_matrices``.

The batched Ω kernel (this reference and ``omega_triton``): not called by the
library yet; the planned GPU dense-solve path builds Ω with it; tested by
tests/test_kernels_omega.py.
"""

from __future__ import annotations

import torch


def guidance_matrices(
    delta: torch.Tensor,
    input_factor_inverse: torch.Tensor,
    sigma: torch.Tensor,
    variance_weight: torch.Tensor,
    alpha: float,
) -> torch.Tensor:
    """``Ω`` for a batch: ``delta`` (B, d_in, d_out), ``input_factor_inverse`` (B, d_in, d_in),
    ``sigma`` and ``variance_weight`` (B,). Returns (B, d_in, d_in) in ``delta``'s dtype."""
    _check_shapes(delta, input_factor_inverse, sigma, variance_weight)
    dtype = delta.dtype
    bias_scale = (-alpha / sigma.to(dtype) ** 2).reshape(-1, 1, 1)
    bias = bias_scale * (delta @ delta.mT)
    zinv = input_factor_inverse.to(dtype)
    variance = variance_weight.to(dtype).reshape(-1, 1, 1) * (0.5 * (zinv + zinv.mT))
    omega = bias + variance
    return 0.5 * (omega + omega.mT)


def _check_shapes(delta, input_factor_inverse, sigma, variance_weight) -> None:
    if delta.dim() != 3:
        raise ValueError(f"delta must be (B, d_in, d_out), got {tuple(delta.shape)}")
    batch, d_in, _ = delta.shape
    if tuple(input_factor_inverse.shape) != (batch, d_in, d_in):
        raise ValueError(
            f"input_factor_inverse must be ({batch}, {d_in}, {d_in}), got {tuple(input_factor_inverse.shape)}"
        )
    if sigma.shape != (batch,) or variance_weight.shape != (batch,):
        raise ValueError(
            f"sigma and variance_weight must have shape ({batch},), "
            f"got {tuple(sigma.shape)} and {tuple(variance_weight.shape)}"
        )
