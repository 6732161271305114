"""Eigen-solvers for the Initialization Guidance Matrix Ω.

The reference solver is dense: ``torch.linalg.eigh`` in float64, exact up to
rounding. It is the oracle the iterative solvers are tested against.
"""

from __future__ import annotations

from typing import Tuple

import torch

EIGH_BACKEND = "torch.linalg.eigh (float64)"


def smallest_eigenpairs(matrix: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` smallest eigenvalues (ascending) and eigenvectors (columns) of a
    symmetric matrix, computed densely in float64 with ``torch.linalg.eigh``."""
    if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"expected a square matrix, got shape {tuple(matrix.shape)}")
    if not 1 <= k <= matrix.shape[0]:
        raise ValueError(f"k={k} must lie in [1, {matrix.shape[0]}]")
    values, vectors = torch.linalg.eigh(matrix.to(torch.float64))
    return values[:k], vectors[:, :k]


def fix_column_signs(vectors: torch.Tensor) -> torch.Tensor:
    """Flip each column so that its largest-magnitude entry is positive (the first
    such entry on ties), making eigenvectors deterministic."""
    index = vectors.abs().argmax(dim=0, keepdim=True)
    signs = torch.sign(torch.gather(vectors, 0, index))
    signs[signs == 0] = 1
    return vectors * signs
