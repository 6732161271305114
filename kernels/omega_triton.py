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
module, so it is not autotuned): ``triton_launch.omega_blocks``. Element offsets are
int64 (``module · d_in²`` passes 2³¹ for 18 modules of d_in = 11008), formed once;
the pointers advance by an int64 step per reduction block.
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
    # 64-bit element offsets: module · d_in², and rows · stride, may exceed 2³¹.
    module64 = module.to(tl.int64)
    delta_ptr += module64 * stride_db
    zinv_ptr += module64 * stride_zb
    omega_ptr += module64 * stride_ob
    rows = tile_row * BLOCK_D + tl.arange(0, BLOCK_D)
    cols = tile_col * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < d_in
    col_ok = cols < d_in
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    ks64 = ks.to(tl.int64)
    left_ptrs = delta_ptr + rows64[:, None] * stride_dr + ks64[None, :] * stride_dc
    # Δ of the column block, transposed: BLOCK_K x BLOCK_D
    right_ptrs = delta_ptr + cols64[None, :] * stride_dr + ks64[:, None] * stride_dc
    step = (stride_dc + tl.zeros((), dtype=tl.int64)) * BLOCK_K
    acc = tl.zeros((BLOCK_D, BLOCK_D), dtype=omega_ptr.dtype.element_ty)
    for k0 in range(0, d_out, BLOCK_K):
        k_ok = k0 + ks < d_out
        left = tl.load(left_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        right = tl.load(right_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if USE_DOT:
            acc = tl.dot(left, right, acc, input_precision=DOT_PRECISION)
        else:
            acc += tl.sum(left[:, :, None] * right[None, :, :], axis=1)
        left_ptrs += step
        right_ptrs += step
    if tile_row == tile_col:  # make the diagonal tile's own product exactly symmetric
        acc = 0.5 * (acc + tl.trans(acc))
    bias_scale = tl.load(bias_scale_ptr + module64)  # −α/σ², the σ normalization of Δ̂
    weight = tl.load(weight_ptr + module64)
    tile_ok = row_ok[:, None] & col_ok[None, :]
    zinv_upper = tl.load(zinv_ptr + rows64[:, None] * stride_zr + cols64[None, :] * stride_zc, mask=tile_ok, other=0.0)
    zinv_lower = tl.load(zinv_ptr + cols64[None, :] * stride_zr + rows64[:, None] * stride_zc, mask=tile_ok, other=0.0)
    omega = acc * bias_scale + weight * (0.5 * (zinv_upper + zinv_lower))
    tl.store(omega_ptr + rows64[:, None] * stride_or + cols64[None, :] * stride_oc, omega, mask=tile_ok)
    if tile_row != tile_col:
        tl.store(omega_ptr + cols64[None, :] * stride_or + rows64[:, None] * stride_oc, omega, mask=tile_ok)


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
