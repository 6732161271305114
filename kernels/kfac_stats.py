"""K-FAC statistics accumulation: plain-PyTorch reference.

For one group of modules fed the same input ``a`` (``T x d_in``) and, for each
member, its output gradient ``g`` (``T x d_out``), with per-token weights ``m``
(``T``; 0 for tokens outside the token mask), the accumulators are updated in
place (symbols of docs/math.md §2 Statistics, before the ``1/|T|`` and ``1/n``
normalizations):

* ``input_factor_sum  += aᵀ diag(m) a``     (Z, one per group)
* ``output_factor_diag_sum += Σ_t m_t g_t²``  (y, one per member)
* ``grad_sum          += gᵀ a``             (G, one per member)

The gradient sum is *not* masked: ``Σ_t g_t a_tᵀ`` over every token is the exact
weight gradient of the loss, including tokens that carry no loss themselves but
influence others through attention (e.g. prompt tokens with ``token_mask="labels"``).
Accumulators may be float32 or float64; inputs of lower precision are upcast.

:func:`accumulate_input_factor` is the reference (one full ``addmm``). The CPU
fast path uses :func:`accumulate_input_factor_lower`, the same sum on the lower
triangle only (column panels of ``PANEL_WIDTH``: about 40% fewer flops than the
full product since Z is symmetric), then :func:`mirror_lower_triangle` once
when the pass ends (docs/math.md §5.5 Accumulating Z on its lower triangle).
"""

from __future__ import annotations

from typing import Optional

import torch


def accumulate_input_factor(
    input_factor_sum: torch.Tensor, inputs: torch.Tensor, token_weights: Optional[torch.Tensor]
) -> None:
    """``input_factor_sum += inputsᵀ diag(token_weights) inputs`` (reference)."""
    a = inputs.to(input_factor_sum.dtype)
    weighted = a if token_weights is None else a * token_weights.to(a.dtype).unsqueeze(1)
    input_factor_sum.addmm_(weighted.T, a)


PANEL_WIDTH = 128  # float32, measured on 2 x86 cores: 128-192 is best for d_in in 576..1536
# float64 (the default Z accumulator, docs/math.md §5.6): wider panels, fewer and larger
# GEMMs; on the same (busy) 2 cores 384 beat 128 by 1.2-2x at d_in 576 and 1536 in two runs
PANEL_WIDTH_FLOAT64 = 384


def accumulate_input_factor_lower(
    input_factor_sum: torch.Tensor, inputs: torch.Tensor, token_weights: Optional[torch.Tensor]
) -> None:
    """``input_factor_sum += inputsᵀ diag(token_weights) inputs`` on the lower triangle
    (the diagonal blocks are full; entries strictly above them are left stale).

    Column panel ``[s, s+w)`` of rows ``s..d`` (``w``: ``PANEL_WIDTH``, ``PANEL_WIDTH_FLOAT64`` for float64 sums): ``Z[s:, s:s+w] += (m·a[:, s:])ᵀ a[:, s:s+w]``,
    an ``addmm`` into a strided view (no copy). Call :func:`mirror_lower_triangle`
    once after the last accumulation.
    """
    a = inputs.to(input_factor_sum.dtype)
    weighted = a if token_weights is None else a * token_weights.to(a.dtype).unsqueeze(1)
    d_in = a.shape[1]
    width = PANEL_WIDTH_FLOAT64 if a.dtype == torch.float64 else PANEL_WIDTH
    for start in range(0, d_in, width):
        end = min(start + width, d_in)
        input_factor_sum[start:, start:end].addmm_(weighted[:, start:].T, a[:, start:end])


def mirror_lower_triangle(input_factor_sum: torch.Tensor) -> None:
    """Copy the strictly-lower triangle onto the upper one, in place (end of pass)."""
    input_factor_sum.copy_(input_factor_sum.tril() + input_factor_sum.tril(-1).T)


def accumulate_output_statistics(
    output_factor_diag_sum: torch.Tensor,
    grad_sum: torch.Tensor,
    output_grads: torch.Tensor,
    inputs: torch.Tensor,
    token_weights: Optional[torch.Tensor],
) -> None:
    """``output_factor_diag_sum += Σ_t m_t g_t²`` and ``grad_sum += gᵀ a`` (reference)."""
    g = output_grads.to(grad_sum.dtype)
    squared = g * g
    if token_weights is not None:
        squared = squared * token_weights.to(g.dtype).unsqueeze(1)
    output_factor_diag_sum.add_(squared.sum(dim=0))
    grad_sum.addmm_(g.T, inputs.to(grad_sum.dtype))
