"""K-FAC statistics accumulation: Triton kernels (reference: ``kfac_stats.py``).

Same functions, same in-place contract as the plain-PyTorch reference, for one
group's inputs ``a`` (``T x d_in``), a member's output gradients ``g``
(``T x d_out``) and per-token weights ``m`` (``T``, 0 for tokens outside the
token mask):

* :func:`accumulate_input_factor`:  ``input_factor_sum += aᵀ diag(m) a`` on the
  **upper-triangle tiles only** (tile ``(i, j)`` with ``j >= i``). Between calls
  the strictly-lower tiles are stale; call :func:`finalize_input_factor` once
  when the pass ends to mirror the upper triangle into the lower one.
* :func:`accumulate_output_statistics`: ``output_factor_diag_sum += Σ_t m_t g_t²``
  and ``grad_sum += gᵀ a`` in one kernel (the gradient sum is not masked, as in
  the reference: it is the exact weight gradient).

Inputs may be bf16, fp16 or fp32 and need not be contiguous; accumulators are
fp32. Products run on ``tl.dot`` (tensor cores on a GPU) with fp32
accumulation; fp32 inputs use IEEE fp32 products (no TF32), matching the
reference. Token weights are applied to one operand in the input precision
before the product: exact for 0/1 masks, one rounding of ``m_t a_t`` otherwise.
No row gather, no host synchronization: masked tokens are multiplied by zero.

Launch policy (autotune table, ``tl.dot`` precision, the interpreter switch) is in
``triton_launch``. Under ``TRITON_INTERPRET=1`` (CPU tests) the loaded tiles are cast to
fp32, because the interpreter's bf16/fp16 arithmetic is not the GPU's, and a single
autotune configuration is used.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import triton_launch

SUPPORTED_INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------------------
# Z += aᵀ diag(m) a, upper-triangle tiles
# ----------------------------------------------------------------------------------------
@triton.autotune(configs=triton_launch.statistics_configs(), key=["d_in"], restore_value=["input_factor_ptr"])
@triton.jit
def _input_factor_kernel(
    input_factor_ptr,
    inputs_ptr,
    weights_ptr,
    num_tokens,
    d_in,
    stride_zr,
    stride_zc,
    stride_at,
    stride_ad,
    HAS_WEIGHTS: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    tile_row = tl.program_id(0)
    tile_col = tl.program_id(1)
    if tile_col < tile_row:  # strictly-lower tile: its mirror does the work
        return
    rows = tile_row * BLOCK_D + tl.arange(0, BLOCK_D)
    cols = tile_col * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < d_in
    col_ok = cols < d_in
    tokens = tl.arange(0, BLOCK_T)
    acc = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
    for t0 in range(0, num_tokens, BLOCK_T):
        t = t0 + tokens
        t_ok = t < num_tokens
        # aᵀ tile of the row block, loaded transposed: BLOCK_D x BLOCK_T
        left = tl.load(
            inputs_ptr + rows[:, None] * stride_ad + t[None, :] * stride_at,
            mask=row_ok[:, None] & t_ok[None, :],
            other=0.0,
        )
        right = tl.load(
            inputs_ptr + t[:, None] * stride_at + cols[None, :] * stride_ad,
            mask=t_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        if HAS_WEIGHTS:
            m = tl.load(weights_ptr + t, mask=t_ok, other=0.0)
            left = (left.to(tl.float32) * m[None, :]).to(left.dtype)
        if UPCAST:
            left = left.to(tl.float32)
            right = right.to(tl.float32)
        acc = tl.dot(left, right, acc, input_precision=DOT_PRECISION)
    z_ptrs = input_factor_ptr + rows[:, None] * stride_zr + cols[None, :] * stride_zc
    z_ok = row_ok[:, None] & col_ok[None, :]
    previous = tl.load(z_ptrs, mask=z_ok, other=0.0)
    tl.store(z_ptrs, previous + acc, mask=z_ok)


# ----------------------------------------------------------------------------------------
# y += Σ_t m_t g_t², G += gᵀ a
# ----------------------------------------------------------------------------------------
@triton.autotune(
    configs=triton_launch.statistics_configs(),
    key=["d_out", "d_in"],
    restore_value=["grad_sum_ptr", "output_factor_diag_ptr"],
)
@triton.jit
def _output_statistics_kernel(
    output_factor_diag_ptr,
    grad_sum_ptr,
    grads_ptr,
    inputs_ptr,
    weights_ptr,
    num_tokens,
    d_out,
    d_in,
    stride_gsr,
    stride_gsc,
    stride_gt,
    stride_gd,
    stride_at,
    stride_ad,
    HAS_WEIGHTS: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    tile_row = tl.program_id(0)  # over d_out
    tile_col = tl.program_id(1)  # over d_in
    rows = tile_row * BLOCK_D + tl.arange(0, BLOCK_D)
    cols = tile_col * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < d_out
    col_ok = cols < d_in
    tokens = tl.arange(0, BLOCK_T)
    acc = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
    diag = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for t0 in range(0, num_tokens, BLOCK_T):
        t = t0 + tokens
        t_ok = t < num_tokens
        grads_t = tl.load(
            grads_ptr + rows[:, None] * stride_gd + t[None, :] * stride_gt,
            mask=row_ok[:, None] & t_ok[None, :],
            other=0.0,
        )
        inputs = tl.load(
            inputs_ptr + t[:, None] * stride_at + cols[None, :] * stride_ad,
            mask=t_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        if tile_col == 0:  # the first column of programs also owns y
            squared = grads_t.to(tl.float32) * grads_t.to(tl.float32)
            if HAS_WEIGHTS:
                m = tl.load(weights_ptr + t, mask=t_ok, other=0.0)
                squared = squared * m[None, :]
            diag += tl.sum(squared, axis=1)
        if UPCAST:
            grads_t = grads_t.to(tl.float32)
            inputs = inputs.to(tl.float32)
        acc = tl.dot(grads_t, inputs, acc, input_precision=DOT_PRECISION)
    g_ptrs = grad_sum_ptr + rows[:, None] * stride_gsr + cols[None, :] * stride_gsc
    g_ok = row_ok[:, None] & col_ok[None, :]
    previous = tl.load(g_ptrs, mask=g_ok, other=0.0)
    tl.store(g_ptrs, previous + acc, mask=g_ok)
    if tile_col == 0:
        y_ptrs = output_factor_diag_ptr + rows
        tl.store(y_ptrs, tl.load(y_ptrs, mask=row_ok, other=0.0) + diag, mask=row_ok)


# ----------------------------------------------------------------------------------------
# Python wrappers (same signatures as the reference)
# ----------------------------------------------------------------------------------------
def _check_inputs(name: str, tensor: torch.Tensor, accumulator: torch.Tensor) -> None:
    if tensor.dim() != 2:
        raise ValueError(f"{name} must be (tokens, features), got shape {tuple(tensor.shape)}")
    if tensor.dtype not in SUPPORTED_INPUT_DTYPES:
        raise TypeError(f"Triton statistics kernels take bf16/fp16/fp32 {name}, got {tensor.dtype}")
    if accumulator.dtype != torch.float32:
        raise TypeError(f"Triton statistics kernels accumulate in float32, got a {accumulator.dtype} accumulator")
    if tensor.device != accumulator.device:
        raise ValueError(f"{name} on {tensor.device} but the accumulator on {accumulator.device}")
    triton_launch.check_device(tensor.device, "the Triton statistics kernels")


def _weights(token_weights: Optional[torch.Tensor], num_tokens: int, device) -> Optional[torch.Tensor]:
    if token_weights is None:
        return None
    weights = token_weights.reshape(-1)
    if weights.numel() != num_tokens:
        raise ValueError(f"token_weights has {weights.numel()} entries for {num_tokens} tokens")
    return weights.to(device=device, dtype=torch.float32).contiguous()


def accumulate_input_factor(
    input_factor_sum: torch.Tensor, inputs: torch.Tensor, token_weights: Optional[torch.Tensor]
) -> None:
    """``input_factor_sum += inputsᵀ diag(token_weights) inputs`` on upper-triangle tiles.

    Call :func:`finalize_input_factor` once after the last accumulation.
    """
    _check_inputs("inputs", inputs, input_factor_sum)
    num_tokens, d_in = inputs.shape
    if input_factor_sum.shape != (d_in, d_in):
        raise ValueError(f"input_factor_sum is {tuple(input_factor_sum.shape)}, expected ({d_in}, {d_in})")
    if num_tokens == 0:
        return
    weights = _weights(token_weights, num_tokens, inputs.device)

    def grid(meta):
        tiles = triton.cdiv(d_in, meta["BLOCK_D"])
        return (tiles, tiles)

    _input_factor_kernel[grid](
        input_factor_sum,
        inputs,
        weights if weights is not None else inputs,
        num_tokens,
        d_in,
        input_factor_sum.stride(0),
        input_factor_sum.stride(1),
        inputs.stride(0),
        inputs.stride(1),
        HAS_WEIGHTS=weights is not None,
        UPCAST=triton_launch.UPCAST_TILES,
        DOT_PRECISION=triton_launch.dot_precision(inputs.dtype),
    )


def accumulate_output_statistics(
    output_factor_diag_sum: torch.Tensor,
    grad_sum: torch.Tensor,
    output_grads: torch.Tensor,
    inputs: torch.Tensor,
    token_weights: Optional[torch.Tensor],
) -> None:
    """``output_factor_diag_sum += Σ_t m_t g_t²`` and ``grad_sum += gᵀ a`` in one launch."""
    _check_inputs("output_grads", output_grads, grad_sum)
    _check_inputs("inputs", inputs, grad_sum)
    if output_factor_diag_sum.dtype != torch.float32:
        raise TypeError(f"Triton statistics kernels accumulate in float32, got {output_factor_diag_sum.dtype}")
    num_tokens, d_out = output_grads.shape
    d_in = inputs.shape[1]
    if inputs.shape[0] != num_tokens:
        raise ValueError(f"{num_tokens} output-gradient rows but {inputs.shape[0]} input rows")
    if grad_sum.shape != (d_out, d_in) or output_factor_diag_sum.shape != (d_out,):
        raise ValueError(
            f"grad_sum is {tuple(grad_sum.shape)} and output_factor_diag_sum {tuple(output_factor_diag_sum.shape)}, "
            f"expected ({d_out}, {d_in}) and ({d_out},)"
        )
    if output_factor_diag_sum.device != grad_sum.device:
        raise ValueError(f"output_factor_diag_sum on {output_factor_diag_sum.device} but grad_sum on {grad_sum.device}")
    if num_tokens == 0:
        return
    weights = _weights(token_weights, num_tokens, inputs.device)
    # Mixed 16-bit dtypes (e.g. bf16 activations, fp32 gradients) meet in the wider one.
    if output_grads.dtype != inputs.dtype:
        wide = torch.promote_types(output_grads.dtype, inputs.dtype)
        output_grads, inputs = output_grads.to(wide), inputs.to(wide)

    def grid(meta):
        return (triton.cdiv(d_out, meta["BLOCK_D"]), triton.cdiv(d_in, meta["BLOCK_D"]))

    _output_statistics_kernel[grid](
        output_factor_diag_sum,
        grad_sum,
        output_grads,
        inputs,
        weights if weights is not None else inputs,
        num_tokens,
        d_out,
        d_in,
        grad_sum.stride(0),
        grad_sum.stride(1),
        output_grads.stride(0),
        output_grads.stride(1),
        inputs.stride(0),
        inputs.stride(1),
        HAS_WEIGHTS=weights is not None,
        UPCAST=triton_launch.UPCAST_TILES,
        DOT_PRECISION=triton_launch.dot_precision(inputs.dtype),
    )


def finalize_input_factor(input_factor_sum: torch.Tensor) -> None:
    """Mirror the accumulated upper triangle into the lower one, in place (once per pass).

    Entries strictly below the diagonal, including those of the diagonal tiles,
    are replaced by their mirror images, so the result is exactly symmetric.
    """
    upper = torch.triu(input_factor_sum)
    input_factor_sum.copy_(upper + torch.triu(input_factor_sum, diagonal=1).mT)
