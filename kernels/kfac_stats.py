"""K-FAC statistics accumulation: plain-PyTorch reference.

For one group of modules fed the same input ``a`` (``T x d_in``) and, for each
member, its output gradient ``g`` (``T x d_out``), with per-token weights ``m``
(``T``; 0 for tokens outside the token mask), the accumulators are updated in
place (symbols of SPEC.md, before the ``1/|T|`` and ``1/n`` normalizations):

* ``input_factor_sum  += aᵀ diag(m) a``     (Z, one per group)
* ``output_factor_diag_sum += Σ_t m_t g_t²``  (y, one per member)
* ``grad_sum          += gᵀ a``             (G, one per member)

The gradient sum is *not* masked: ``Σ_t g_t a_tᵀ`` over every token is the exact
weight gradient of the loss, including tokens that carry no loss themselves but
influence others through attention (e.g. prompt tokens with ``token_mask="labels"``).
Accumulators may be float32 or float64; inputs of lower precision are upcast.
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
