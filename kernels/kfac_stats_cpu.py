"""K-FAC statistics accumulation on the CPU: Z's lower triangle in float64 by OpenBLAS's
``dsyrk`` in the compiled core (``csrc/gram_cpu.cpp``).

The same sum as :func:`kfac_stats.accumulate_input_factor` (the reference) on the lower
triangle, diagonal included, as :func:`kfac_stats.accumulate_input_factor_lower` leaves it
(entries strictly above the diagonal stale until :func:`kfac_stats.mirror_lower_triangle`
at the end of the pass). Torch has no ``syrk``: its panels of ``addmm`` do 1.3-1.6x the
triangle's flops. What one SmolLM2 batch of 1024 rows accumulates (30 layers x three
``d_in = 576`` inputs and one of 1536) took 0.66 s here against 0.84 s by the panels on
2 Intel cores (``python bench/bench_kfac_cpu.py``).

Token weights ``m`` enter as rows scaled by ``√m`` (``Σ m a aᵀ = Σ (√m a)(√m a)ᵀ``, exact for
0/1 masks and within float64 rounding otherwise), so they must be finite and non-negative:
``lora_da.token_masks`` refuses any other mask before the forward, in its one host read of
the batch (checking here would cost a host read per module). Float32 sums and anything not
on the CPU go to the panel path.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import kfac_stats


def _core():
    from .._native import core  # lora_da._native: imported on first use (kernels/ stays importable alone)

    return core()


def accumulate_input_factor_lower(
    input_factor_sum: torch.Tensor, inputs: torch.Tensor, token_weights: Optional[torch.Tensor]
) -> None:
    """``input_factor_sum += inputsᵀ diag(token_weights) inputs`` on the lower triangle
    (``token_weights``: finite, ``>= 0``; ``None`` = all ones)."""
    if (
        input_factor_sum.device.type != "cpu"
        or input_factor_sum.dtype != torch.float64
        or not input_factor_sum.is_contiguous()
        or inputs.dim() != 2
    ):
        kfac_stats.accumulate_input_factor_lower(input_factor_sum, inputs, token_weights)
        return
    rows = inputs.to(torch.float64)
    if token_weights is not None:
        rows = rows * token_weights.to(torch.float64).sqrt().unsqueeze(1)
    rows = rows.contiguous()
    num_rows, d_in = rows.shape
    if input_factor_sum.shape != (d_in, d_in):
        raise ValueError(f"input_factor_sum is {tuple(input_factor_sum.shape)}, expected ({d_in}, {d_in})")
    _core().gram_lower_accumulate(
        input_factor_sum.data_ptr(), rows.data_ptr(), num_rows, d_in, torch.get_num_threads()
    )
