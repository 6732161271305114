"""K-FAC input factor on the CPU through the compiled core's BLAS: one triangle, exactly.

:func:`accumulate_input_factor` has the contract of
:func:`lora_da.kernels.kfac_stats.accumulate_input_factor_lower` (``Z += aᵀ diag(m) a``
on the lower triangle, the diagonal included; entries above it are left stale until
:func:`lora_da.kernels.kfac_stats.mirror_lower_triangle` runs at the end of the pass)
and :func:`lora_da.kernels.kfac_stats.accumulate_input_factor` (one full ``addmm``) is
its reference.

Where it applies (a contiguous float32 or float64 accumulator on the CPU) it hands the
product to OpenBLAS's ``?syrk`` (no token weights) or ``?gemmt`` (rows scaled by their
weights on one side) through ``lora_da._core.accumulate_gram_lower``: they compute the
``d(d+1)/2`` entries of the triangle and nothing else, where the panel products of the
torch path also fill part of the other triangle (docs/math.md §5.5). Anything else
(another device, a strided accumulator) takes the torch path. The products are in the
accumulator's dtype: float32 activations are upcast first, as on the torch path, so the
sum is the same up to the order of the additions.
"""

from __future__ import annotations

from typing import Optional

import torch

from .._native import core
from . import kfac_stats

_DTYPES = {torch.float32: "float32", torch.float64: "float64"}


def applies(input_factor_sum: torch.Tensor) -> bool:
    """Whether :func:`accumulate_input_factor` runs the BLAS call for this accumulator."""
    return (
        input_factor_sum.device.type == "cpu"
        and input_factor_sum.dtype in _DTYPES
        and input_factor_sum.is_contiguous()
        and input_factor_sum.dim() == 2
        and input_factor_sum.shape[0] == input_factor_sum.shape[1]
    )


def accumulate_input_factor(
    input_factor_sum: torch.Tensor, inputs: torch.Tensor, token_weights: Optional[torch.Tensor]
) -> None:
    """``input_factor_sum += inputsᵀ diag(token_weights) inputs`` on the lower triangle (with
    the diagonal); the strictly upper triangle is not written. ``inputs``: ``(T, d)``;
    ``token_weights``: ``(T,)`` or ``None`` (every row weight 1)."""
    if not applies(input_factor_sum):
        kfac_stats.accumulate_input_factor_lower(input_factor_sum, inputs, token_weights)
        return
    d_in = input_factor_sum.shape[0]
    if inputs.dim() != 2 or inputs.shape[1] != d_in:
        raise ValueError(f"inputs must be (T, {d_in}) for a {d_in} x {d_in} input factor, got {tuple(inputs.shape)}")
    if inputs.shape[0] == 0:
        return  # an empty batch adds nothing (and an empty tensor may have no storage)
    rows = inputs.to(device="cpu", dtype=input_factor_sum.dtype).contiguous()
    weighted = None
    if token_weights is not None:
        if token_weights.shape != (rows.shape[0],):
            raise ValueError(f"token_weights must be ({rows.shape[0]},) for {rows.shape[0]} rows, got {tuple(token_weights.shape)}")
        weighted = (rows * token_weights.to(device="cpu", dtype=rows.dtype).unsqueeze(1)).contiguous()
    core().accumulate_gram_lower(
        input_factor_sum.data_ptr(),
        rows.data_ptr(),
        0 if weighted is None else weighted.data_ptr(),
        rows.shape[0],
        d_in,
        _DTYPES[input_factor_sum.dtype],
        torch.get_num_threads(),
    )
