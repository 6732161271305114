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
accumulation; fp32 inputs use IEEE fp32 products by default, matching the
reference (``fp32_precision="tf32x3"`` or ``"tf32"`` trade accuracy for tensor
cores: ``triton_launch.dot_precision``). Token weights are applied to one
operand in the input precision before the product: exact for 0/1 masks, one
rounding of ``m_t a_t`` otherwise. No row gather, no host synchronization:
masked tokens are multiplied by zero.

**Split over tokens.** When the output has few tiles (d = 576: 15 upper tiles of
128 for 132 SMs), the tokens are cut into ``num_splits`` contiguous ranges
(``triton_launch.token_splits``, a function of the shapes only): each program sums
its range into its own slice of an fp32 partial buffer, and a second kernel adds
the slices to the accumulator in split order 0, 1, ... : the same bits on every
run, no atomics.

**Addresses are 64-bit.** ``t · stride`` exceeds 2³¹ for T·d past 2³¹ elements
(262144 tokens x 11008); every element offset is formed in int64 once, outside
the token loop, and the pointers advance by an int64 step per token block
(tests/test_kernels_aot.py checks the compiled IR).

Launch policy (autotune table, splits, ``tl.dot`` precision, the interpreter switch) is
in ``triton_launch``. Under ``TRITON_INTERPRET=1`` (CPU tests) the loaded tiles are cast
to fp32, because the interpreter's bf16/fp16 arithmetic is not the GPU's, and a single
autotune configuration is used.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import triton_launch

SUPPORTED_INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
REDUCE_BLOCK = 64
"""Tile side of the split-reduction kernel (elementwise; not autotuned)."""


@triton.jit
def _int64(x):
    """``x`` (an int32 scalar, or a constexpr when Triton specialized it to 1) as int64."""
    return x + tl.zeros((), dtype=tl.int64)


# ----------------------------------------------------------------------------------------
# Z += aᵀ diag(m) a, upper-triangle tiles
# ----------------------------------------------------------------------------------------
@triton.autotune(
    configs=triton_launch.statistics_configs(),
    key=["d_in", "token_bucket", "HAS_WEIGHTS"],
    prune_configs_by={"early_config_prune": triton_launch.prune_statistics_configs},
    restore_value=["out_ptr"],
)
@triton.jit
def _input_factor_kernel(
    out_ptr,  # Z (SPLIT False), or the partial sums (splits x d_in x d_in, SPLIT True)
    inputs_ptr,
    weights_ptr,
    num_tokens,
    d_in,
    tokens_per_split,
    token_bucket,  # autotune key only
    stride_os,
    stride_or,
    stride_oc,
    stride_at,
    stride_ad,
    HAS_WEIGHTS: tl.constexpr,
    SPLIT: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    tile_row = tl.program_id(0)
    tile_col = tl.program_id(1)
    split = tl.program_id(2)
    if tile_col < tile_row:  # strictly-lower tile: its mirror does the work
        return
    rows = tile_row * BLOCK_D + tl.arange(0, BLOCK_D)
    cols = tile_col * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < d_in
    col_ok = cols < d_in
    t_begin = split * tokens_per_split
    t_end = tl.minimum(t_begin + tokens_per_split, num_tokens)
    tokens = tl.arange(0, BLOCK_T)
    t64 = t_begin.to(tl.int64) + tokens.to(tl.int64)
    # aᵀ tile of the row block, loaded transposed (BLOCK_D x BLOCK_T), and the a tile
    left_ptrs = inputs_ptr + rows.to(tl.int64)[:, None] * stride_ad + t64[None, :] * stride_at
    right_ptrs = inputs_ptr + t64[:, None] * stride_at + cols.to(tl.int64)[None, :] * stride_ad
    weight_ptrs = weights_ptr + t64
    step = _int64(stride_at) * BLOCK_T
    weight_step = _int64(BLOCK_T)
    acc = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
    for t0 in range(t_begin, t_end, BLOCK_T):
        t_ok = t0 + tokens < t_end
        left = tl.load(left_ptrs, mask=row_ok[:, None] & t_ok[None, :], other=0.0)
        right = tl.load(right_ptrs, mask=t_ok[:, None] & col_ok[None, :], other=0.0)
        if HAS_WEIGHTS:
            m = tl.load(weight_ptrs, mask=t_ok, other=0.0)
            left = (left.to(tl.float32) * m[None, :]).to(left.dtype)
            weight_ptrs += weight_step
        if UPCAST:
            left = left.to(tl.float32)
            right = right.to(tl.float32)
        acc = tl.dot(left, right, acc, input_precision=DOT_PRECISION)
        left_ptrs += step
        right_ptrs += step
    out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_or + cols.to(tl.int64)[None, :] * stride_oc
    out_ok = row_ok[:, None] & col_ok[None, :]
    if SPLIT:
        tl.store(out_ptrs + split.to(tl.int64) * stride_os, acc, mask=out_ok)
    else:
        previous = tl.load(out_ptrs, mask=out_ok, other=0.0)
        tl.store(out_ptrs, previous + acc, mask=out_ok)


# ----------------------------------------------------------------------------------------
# y += Σ_t m_t g_t², G += gᵀ a
# ----------------------------------------------------------------------------------------
@triton.autotune(
    configs=triton_launch.statistics_configs(),
    key=["d_out", "d_in", "token_bucket", "HAS_WEIGHTS"],
    prune_configs_by={"early_config_prune": triton_launch.prune_statistics_configs},
    restore_value=["grad_out_ptr", "diag_out_ptr"],
)
@triton.jit
def _output_statistics_kernel(
    diag_out_ptr,  # y, or its partial sums (splits x d_out)
    grad_out_ptr,  # G, or its partial sums (splits x d_out x d_in)
    grads_ptr,
    inputs_ptr,
    weights_ptr,
    num_tokens,
    d_out,
    d_in,
    tokens_per_split,
    token_bucket,  # autotune key only
    stride_ys,
    stride_y,
    stride_os,
    stride_or,
    stride_oc,
    stride_gt,
    stride_gd,
    stride_at,
    stride_ad,
    HAS_WEIGHTS: tl.constexpr,
    SPLIT: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    tile_row = tl.program_id(0)  # over d_out
    tile_col = tl.program_id(1)  # over d_in
    split = tl.program_id(2)
    rows = tile_row * BLOCK_D + tl.arange(0, BLOCK_D)
    cols = tile_col * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < d_out
    col_ok = cols < d_in
    t_begin = split * tokens_per_split
    t_end = tl.minimum(t_begin + tokens_per_split, num_tokens)
    tokens = tl.arange(0, BLOCK_T)
    t64 = t_begin.to(tl.int64) + tokens.to(tl.int64)
    grad_ptrs = grads_ptr + rows.to(tl.int64)[:, None] * stride_gd + t64[None, :] * stride_gt
    input_ptrs = inputs_ptr + t64[:, None] * stride_at + cols.to(tl.int64)[None, :] * stride_ad
    weight_ptrs = weights_ptr + t64
    grad_step = _int64(stride_gt) * BLOCK_T
    input_step = _int64(stride_at) * BLOCK_T
    weight_step = _int64(BLOCK_T)
    acc = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
    diag = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for t0 in range(t_begin, t_end, BLOCK_T):
        t_ok = t0 + tokens < t_end
        grads_t = tl.load(grad_ptrs, mask=row_ok[:, None] & t_ok[None, :], other=0.0)
        inputs = tl.load(input_ptrs, mask=t_ok[:, None] & col_ok[None, :], other=0.0)
        if tile_col == 0:  # the first column of programs also owns y
            squared = grads_t.to(tl.float32) * grads_t.to(tl.float32)
            if HAS_WEIGHTS:
                m = tl.load(weight_ptrs, mask=t_ok, other=0.0)
                squared = squared * m[None, :]
            diag += tl.sum(squared, axis=1)
        weight_ptrs += weight_step
        if UPCAST:
            grads_t = grads_t.to(tl.float32)
            inputs = inputs.to(tl.float32)
        acc = tl.dot(grads_t, inputs, acc, input_precision=DOT_PRECISION)
        grad_ptrs += grad_step
        input_ptrs += input_step
    out_ptrs = grad_out_ptr + rows.to(tl.int64)[:, None] * stride_or + cols.to(tl.int64)[None, :] * stride_oc
    out_ok = row_ok[:, None] & col_ok[None, :]
    y_ptrs = diag_out_ptr + rows.to(tl.int64) * stride_y
    if SPLIT:
        split64 = split.to(tl.int64)
        tl.store(out_ptrs + split64 * stride_os, acc, mask=out_ok)
        if tile_col == 0:
            tl.store(y_ptrs + split64 * stride_ys, diag, mask=row_ok)
    else:
        previous = tl.load(out_ptrs, mask=out_ok, other=0.0)
        tl.store(out_ptrs, previous + acc, mask=out_ok)
        if tile_col == 0:
            tl.store(y_ptrs, tl.load(y_ptrs, mask=row_ok, other=0.0) + diag, mask=row_ok)


# ----------------------------------------------------------------------------------------
# sum += partial[0] + partial[1] + ... (split order), elementwise
# ----------------------------------------------------------------------------------------
@triton.jit
def _reduce_splits_kernel(
    sum_ptr,
    partial_ptr,  # contiguous (num_splits, num_rows, num_cols)
    num_rows,
    num_cols,
    num_splits,
    split_stride,
    stride_sr,
    stride_sc,
    UPPER: tl.constexpr,  # only entries with row <= col (Z: its upper triangle)
    BLOCK: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = (rows < num_rows)[:, None] & (cols < num_cols)[None, :]
    if UPPER:
        ok = ok & (rows[:, None] <= cols[None, :])
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    part_ptrs = partial_ptr + rows64[:, None] * num_cols + cols64[None, :]
    step = _int64(split_stride)
    total = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for _ in range(0, num_splits):
        total += tl.load(part_ptrs, mask=ok, other=0.0)
        part_ptrs += step
    sum_ptrs = sum_ptr + rows64[:, None] * stride_sr + cols64[None, :] * stride_sc
    tl.store(sum_ptrs, tl.load(sum_ptrs, mask=ok, other=0.0) + total, mask=ok)


def _reduce_splits(accumulator: torch.Tensor, partials: torch.Tensor, upper: bool) -> None:
    """``accumulator += Σ_s partials[s]`` in split order (``upper``: entries row <= col only)."""
    matrix = accumulator if accumulator.dim() == 2 else accumulator.unsqueeze(0)
    num_rows, num_cols = matrix.shape
    grid = (triton.cdiv(num_rows, REDUCE_BLOCK), triton.cdiv(num_cols, REDUCE_BLOCK))
    _reduce_splits_kernel[grid](
        matrix, partials, num_rows, num_cols, partials.shape[0], num_rows * num_cols,
        matrix.stride(0), matrix.stride(1), UPPER=upper, BLOCK=REDUCE_BLOCK,
    )


# ----------------------------------------------------------------------------------------
# Python wrappers (same signatures as the reference, plus launch options)
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
    input_factor_sum: torch.Tensor,
    inputs: torch.Tensor,
    token_weights: Optional[torch.Tensor],
    *,
    fp32_precision: str = "ieee",
    num_splits: Optional[int] = None,
) -> None:
    """``input_factor_sum += inputsᵀ diag(token_weights) inputs`` on upper-triangle tiles.

    Call :func:`finalize_input_factor` once after the last accumulation.
    ``fp32_precision``: ``tl.dot`` precision for fp32 inputs (``triton_launch.dot_precision``).
    ``num_splits``: token ranges summed separately (default: ``triton_launch.token_splits``).
    """
    _check_inputs("inputs", inputs, input_factor_sum)
    num_tokens, d_in = inputs.shape
    if input_factor_sum.shape != (d_in, d_in):
        raise ValueError(f"input_factor_sum is {tuple(input_factor_sum.shape)}, expected ({d_in}, {d_in})")
    precision = triton_launch.dot_precision(inputs.dtype, fp32_precision)
    if num_tokens == 0:
        return
    weights = _weights(token_weights, num_tokens, inputs.device)
    tiles = triton.cdiv(d_in, triton_launch.SPLIT_BLOCK_D)
    splits = triton_launch.token_splits(num_tokens, tiles * (tiles + 1) // 2, d_in * d_in, num_splits)
    split = splits.count > 1
    out = input_factor_sum
    if split:
        out = torch.empty((splits.count, d_in, d_in), dtype=torch.float32, device=inputs.device)

    def grid(meta):
        tiles = triton.cdiv(d_in, meta["BLOCK_D"])
        return (tiles, tiles, splits.count)

    _input_factor_kernel[grid](
        out,
        inputs,
        weights if weights is not None else inputs,
        num_tokens,
        d_in,
        splits.tokens_per_split,
        splits.bucket,
        out.stride(0) if split else 0,
        out.stride(-2),
        out.stride(-1),
        inputs.stride(0),
        inputs.stride(1),
        HAS_WEIGHTS=weights is not None,
        SPLIT=split,
        UPCAST=triton_launch.UPCAST_TILES,
        DOT_PRECISION=precision,
    )
    if split:
        _reduce_splits(input_factor_sum, out, upper=True)


def accumulate_output_statistics(
    output_factor_diag_sum: torch.Tensor,
    grad_sum: torch.Tensor,
    output_grads: torch.Tensor,
    inputs: torch.Tensor,
    token_weights: Optional[torch.Tensor],
    *,
    fp32_precision: str = "ieee",
    num_splits: Optional[int] = None,
) -> None:
    """``output_factor_diag_sum += Σ_t m_t g_t²`` and ``grad_sum += gᵀ a`` in one launch
    (two when the tokens are split). Options as in :func:`accumulate_input_factor`."""
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
    # Mixed 16-bit dtypes (e.g. bf16 activations, fp32 gradients) meet in the wider one.
    if output_grads.dtype != inputs.dtype:
        wide = torch.promote_types(output_grads.dtype, inputs.dtype)
        output_grads, inputs = output_grads.to(wide), inputs.to(wide)
    precision = triton_launch.dot_precision(inputs.dtype, fp32_precision)
    if num_tokens == 0:
        return
    weights = _weights(token_weights, num_tokens, inputs.device)
    programs = triton.cdiv(d_out, triton_launch.SPLIT_BLOCK_D) * triton.cdiv(d_in, triton_launch.SPLIT_BLOCK_D)
    splits = triton_launch.token_splits(num_tokens, programs, d_out * (d_in + 1), num_splits)
    split = splits.count > 1
    y_out, grad_out = output_factor_diag_sum.unsqueeze(0), grad_sum
    if split:
        y_out = torch.empty((splits.count, d_out), dtype=torch.float32, device=inputs.device)
        grad_out = torch.empty((splits.count, d_out, d_in), dtype=torch.float32, device=inputs.device)

    def grid(meta):
        return (triton.cdiv(d_out, meta["BLOCK_D"]), triton.cdiv(d_in, meta["BLOCK_D"]), splits.count)

    _output_statistics_kernel[grid](
        y_out,
        grad_out,
        output_grads,
        inputs,
        weights if weights is not None else inputs,
        num_tokens,
        d_out,
        d_in,
        splits.tokens_per_split,
        splits.bucket,
        y_out.stride(0) if split else 0,
        y_out.stride(1),
        grad_out.stride(0) if split else 0,
        grad_out.stride(-2),
        grad_out.stride(-1),
        output_grads.stride(0),
        output_grads.stride(1),
        inputs.stride(0),
        inputs.stride(1),
        HAS_WEIGHTS=weights is not None,
        SPLIT=split,
        UPCAST=triton_launch.UPCAST_TILES,
        DOT_PRECISION=precision,
    )
    if split:
        _reduce_splits(grad_sum, grad_out, upper=False)
        _reduce_splits(output_factor_diag_sum, y_out, upper=False)


def finalize_input_factor(input_factor_sum: torch.Tensor) -> None:
    """Mirror the accumulated upper triangle into the lower one, in place (once per pass).

    Entries strictly below the diagonal, including those of the diagonal tiles,
    are replaced by their mirror images, so the result is exactly symmetric.
    """
    upper = torch.triu(input_factor_sum)
    input_factor_sum.copy_(upper + torch.triu(input_factor_sum, diagonal=1).mT)
