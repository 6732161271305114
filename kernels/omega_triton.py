"""Batched Initialization Guidance Matrices Ω: Triton kernel (reference: ``omega.py``;
not called by the library yet, see there).

One launch builds, for every module ``b`` of a batch of same-shape modules,

    Ω_b = −(α/σ_b²) Δ_b Δ_bᵀ + w_b · ½(Z⁻¹_b + Z⁻¹_bᵀ)

Grid: (tile, tile, module). Only upper-triangle tiles compute ``Δ Δᵀ``; the
epilogue applies the σ normalization and adds the symmetrized variance term,
then stores the tile and its transpose, so the output is exactly symmetric with
no second pass. ``−α/σ²`` and ``w`` are read from device tensors (no host sync).

fp32 inputs use ``tl.dot`` with IEEE fp32 products (no TF32); fp64 inputs use a
broadcast multiply-and-sum on the FP64 units (``tl.dot`` on fp64 is not available
on every Triton/GPU pair). Block sizes are fixed per dtype (Ω is built once per
module, so it is not autotuned): ``triton_launch.omega_blocks``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_launch
from .omega import _check_shapes


@triton.jit
def _guidance_matrices_kernel(
    omega_ptr,
    delta_ptr,
    zinv_ptr,
    bias_scale_ptr,
    weight_ptr,
    d_in,
    d_out,
    stride_ob,
    stride_or,
    stride_oc,
    stride_db,
    stride_dr,
    stride_dc,
    stride_zb,
    stride_zr,
    stride_zc,
    USE_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    tile_row = tl.program_id(0)
    tile_col = tl.program_id(1)
    module = tl.program_id(2)
    if tile_col < tile_row:
        return
    delta_ptr += module * stride_db
    zinv_ptr += module * stride_zb
    omega_ptr += module * stride_ob
    rows = tile_row * BLOCK_D + tl.arange(0, BLOCK_D)
    cols = tile_col * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < d_in
    col_ok = cols < d_in
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_D, BLOCK_D), dtype=omega_ptr.dtype.element_ty)
    for k0 in range(0, d_out, BLOCK_K):
        k = k0 + ks
        k_ok = k < d_out
        left = tl.load(
            delta_ptr + rows[:, None] * stride_dr + k[None, :] * stride_dc,
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        right = tl.load(  # Δ of the column block, transposed: BLOCK_K x BLOCK_D
            delta_ptr + cols[None, :] * stride_dr + k[:, None] * stride_dc,
            mask=k_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        if USE_DOT:
            acc = tl.dot(left, right, acc, input_precision=DOT_PRECISION)
        else:
            acc += tl.sum(left[:, :, None] * right[None, :, :], axis=1)
    if tile_row == tile_col:  # make the diagonal tile's own product exactly symmetric
        acc = 0.5 * (acc + tl.trans(acc))
    bias_scale = tl.load(bias_scale_ptr + module)  # −α/σ², the σ normalization of Δ̂
    weight = tl.load(weight_ptr + module)
    tile_ok = row_ok[:, None] & col_ok[None, :]
    zinv_upper = tl.load(zinv_ptr + rows[:, None] * stride_zr + cols[None, :] * stride_zc, mask=tile_ok, other=0.0)
    zinv_lower = tl.load(zinv_ptr + cols[None, :] * stride_zr + rows[:, None] * stride_zc, mask=tile_ok, other=0.0)
    omega = acc * bias_scale + weight * (0.5 * (zinv_upper + zinv_lower))
    tl.store(omega_ptr + rows[:, None] * stride_or + cols[None, :] * stride_oc, omega, mask=tile_ok)
    if tile_row != tile_col:
        tl.store(omega_ptr + cols[None, :] * stride_or + rows[:, None] * stride_oc, omega, mask=tile_ok)


def guidance_matrices(
    delta: torch.Tensor,
    input_factor_inverse: torch.Tensor,
    sigma: torch.Tensor,
    variance_weight: torch.Tensor,
    alpha: float,
) -> torch.Tensor:
    """Same as :func:`lora_da.kernels.omega.guidance_matrices`, one Triton launch.

    ``delta`` fp32 or fp64; the other tensors are converted to its dtype and device.
    """
    _check_shapes(delta, input_factor_inverse, sigma, variance_weight)
    dtype = delta.dtype
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"the Triton Ω kernel takes fp32 or fp64 delta, got {dtype}")
    batch, d_in, d_out = delta.shape
    device = delta.device
    triton_launch.check_device(device, "the Triton Ω kernel")
    zinv = input_factor_inverse.to(device=device, dtype=dtype)
    # −α/σ² per module, computed on the device in delta's precision (no host sync).
    bias_scale = (-alpha / sigma.to(device=device, dtype=dtype) ** 2).contiguous()
    weight = variance_weight.to(device=device, dtype=dtype).contiguous()
    omega = torch.empty((batch, d_in, d_in), dtype=dtype, device=device)
    if batch == 0 or d_in == 0:
        return omega
    blocks = triton_launch.omega_blocks(dtype)
    tiles = triton.cdiv(d_in, blocks.block_d)
    _guidance_matrices_kernel[(tiles, tiles, batch)](
        omega,
        delta,
        zinv,
        bias_scale,
        weight,
        d_in,
        d_out,
        *omega.stride(),
        *delta.stride(),
        *zinv.stride(),
        USE_DOT=blocks.use_dot,
        DOT_PRECISION=triton_launch.dot_precision(dtype),
        BLOCK_D=blocks.block_d,
        BLOCK_K=blocks.block_k,
        num_warps=blocks.num_warps,
    )
    return omega
