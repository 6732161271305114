"""``lora-one``: one best-rank-r gradient step (docs/math.md §6.5).

``−G = U S Vᵀ``; ``B = U_r √(S_r/S_1)/√γ_s``, ``A = √(S_r/S_1) V_rᵀ/√γ_s``
(option ``stable_gamma``, default 64 as in the LoRA-One authors' command), so
``s·B·A = s·(−G)_r/(S_1 γ_s)``. The base weight is unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple

import torch

from .base import FULL_STATISTICS, Method, Solution, SolveContext, register, solve_each
from .linalg import signed_pairs, svd


@dataclass(frozen=True)
class LoraOneOptions:
    """``stable_gamma``: γ_s dividing both factors by ``√γ_s``."""

    stable_gamma: float = 64.0

    def __post_init__(self) -> None:
        if self.stable_gamma <= 0:
            raise ValueError(f"stable_gamma must be > 0, got {self.stable_gamma}")


def lora_one_factors(gradient: torch.Tensor, rank: int, stable_gamma: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LoRA-One: ``−G = U S Vᵀ``, ``B = U_r √(S_r/S_1)/√γ_s``, ``A = √(S_r/S_1) V_rᵀ/√γ_s``. Returns (A, B, S_r)."""
    u, s, v = svd(-gradient)
    if float(s[0]) == 0.0:
        raise FloatingPointError("the gradient is exactly zero")
    u_r, v_r = signed_pairs(u[:, :rank], v[:, :rank])
    root = (s[:rank] / s[0]).sqrt() / math.sqrt(stable_gamma)
    return root[:, None] * v_r.T, u_r * root[None, :], s[:rank]


def solve(context: SolveContext) -> Solution:
    def factors(name: str) -> tuple:
        gradient = context.statistics.gradient(name)
        lora_A, lora_B, values = lora_one_factors(gradient, context.settings.rank, context.options.stable_gamma)
        return lora_A, lora_B, values, float(values[0])

    return solve_each(context, "lora-one", factors)


METHOD = register(
    Method(
        name="lora-one",
        solve=solve,
        statistics=FULL_STATISTICS,
        options=LoraOneOptions,
    )
)
