"""``pissa``: the principal singular components of ``W`` (docs/math.md §6.2).

``W = U S Vᵀ``; for ``s = 1``, ``B = U_r √S_r`` and ``A = √S_r V_rᵀ`` (top r), so
``B·A = U_r S_r V_rᵀ``. Reads ``W``, no data; the base weight becomes ``W − s·B·A``
and the stored factors are those for ``s = 1`` (divided by ``√s`` on apply).
"""

from __future__ import annotations

from typing import Tuple

import torch

from ..layers import weight_matrix
from .base import NO_STATISTICS, Method, Solution, SolveContext, register, solve_each
from .linalg import signed_pairs, svd


def weight_svd_factors(weight: torch.Tensor, rank: int, minor: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PiSSA (``minor=False``: top r) / MiLoRA (``minor=True``: bottom r) for ``s = 1``:
    ``B = U_r √S_r``, ``A = √S_r V_rᵀ``, so ``B·A`` is that rank-r part of ``W``. Returns (A, B, S_r)."""
    u, s, v = svd(weight)
    index = slice(s.numel() - rank, s.numel()) if minor else slice(0, rank)
    u_r, v_r = signed_pairs(u[:, index], v[:, index])
    root = s[index].sqrt()
    return root[:, None] * v_r.T, u_r * root[None, :], s[index]


def solve_weight_svd(context: SolveContext, minor: bool, label: str) -> Solution:
    """PiSSA's and MiLoRA's shared solve: one SVD of each module's ``W``."""

    def factors(name: str) -> tuple:
        weight = weight_matrix(name, context.targets[name])
        lora_A, lora_B, values = weight_svd_factors(weight, context.settings.rank, minor=minor)
        return lora_A, lora_B, values, float(values.max())

    return solve_each(context, label, factors)


def solve(context: SolveContext) -> Solution:
    return solve_weight_svd(context, minor=False, label="pissa")


METHOD = register(
    Method(
        name="pissa",
        solve=solve,
        statistics=NO_STATISTICS,
        reads_weight=True,
        offsets_base_weight=True,
        unit_scaling=True,
    )
)
