"""Small float64 linear algebra shared by the SVD-based methods."""

from __future__ import annotations

from typing import Tuple

import torch

from ..solvers import fix_column_signs


def svd(matrix: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``U, S, V`` (``matrix = U diag(S) Vᵀ``, ``S`` descending) in float64."""
    u, s, vh = torch.linalg.svd(matrix.to(torch.float64), full_matrices=False)
    return u, s, vh.T


def signed_pairs(u: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fix the sign of each singular pair (u_i, v_i) jointly: largest-magnitude entry of v_i positive."""
    fixed = fix_column_signs(v)
    flip = torch.where((fixed * v).sum(0) < 0, -1.0, 1.0).to(u.dtype)
    return u * flip, fixed


def symmetric_powers(matrix: torch.Tensor, powers: Tuple[float, ...], floor: float = 0.0) -> Tuple[torch.Tensor, ...]:
    """``matrix^p`` for each ``p`` of ``powers``, from one eigendecomposition of a symmetric
    PSD matrix (eigenvalues clamped at ``floor``), float64."""
    evals, evecs = torch.linalg.eigh(0.5 * (matrix + matrix.T))
    evals = evals.clamp(min=floor)
    return tuple((evecs * evals.pow(power)[None, :]) @ evecs.T for power in powers)
