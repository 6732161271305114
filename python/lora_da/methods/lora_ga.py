"""``lora-ga``: singular vectors of the gradient ``G`` (docs/math.md §6.4).

``G = U S Vᵀ``; ``A = c·V[:, :r]ᵀ``, ``B = c·U[:, r:2r]``, ``c = d_out^{1/4}/√γ_s``
(option ``stable_gamma``, default 16). This is the LoRA-GA authors' default
(direction "ArB2r", scale "stable"); the paper allows any split of the top 2r
indices, and PEFT's port also multiplies B by ``S[r:2r]`` — we follow the
authors' code. Needs ``2r ≤ min(d_in, d_out)``; the base weight becomes ``W − s·B·A``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Tuple

import torch
from torch import nn

from ..layers import linear_dims
from ..solvers import fix_column_signs
from .base import FULL_STATISTICS, Method, Solution, SolveContext, register, solve_each
from .linalg import signed_pairs, svd


@dataclass(frozen=True)
class LoraGAOptions:
    """``stable_gamma``: γ_s of the "stable" scale ``c = d_out^{1/4}/√γ_s``."""

    stable_gamma: float = 16.0

    def __post_init__(self) -> None:
        if self.stable_gamma <= 0:
            raise ValueError(f"stable_gamma must be > 0, got {self.stable_gamma}")


def lora_ga_factors(gradient: torch.Tensor, rank: int, stable_gamma: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LoRA-GA (ArB2r, stable scale): ``A = c·V[:, :r]ᵀ``, ``B = c·U[:, r:2r]``, ``c = d_out^{1/4}/√γ_s``.
    Returns (A, B, S[:2r])."""
    d_out = gradient.shape[0]
    u, s, v = svd(gradient)
    scale = d_out**0.25 / math.sqrt(stable_gamma)
    _, v_a = signed_pairs(u[:, :rank], v[:, :rank])
    u_b = fix_column_signs(u[:, rank : 2 * rank])
    return scale * v_a.T, scale * u_b, s[: 2 * rank]


def check(targets: Dict[str, nn.Module], rank: int, options: LoraGAOptions) -> None:
    """LoRA-GA takes singular vectors r..2r: every module needs ``2r ≤ min(d_in, d_out)``."""
    for name, module in targets.items():
        d_in, d_out = linear_dims(module)
        if 2 * rank > min(d_in, d_out):
            raise ValueError(
                f"lora-ga takes singular vectors r..2r of G: 2·rank={2 * rank} exceeds "
                f"min(d_in, d_out)={min(d_in, d_out)} of module '{name}'"
            )


def solve(context: SolveContext) -> Solution:
    def factors(name: str) -> tuple:
        gradient = context.statistics.gradient(name)
        lora_A, lora_B, values = lora_ga_factors(gradient, context.settings.rank, context.options.stable_gamma)
        return lora_A, lora_B, values, float(values[0])

    return solve_each(context, "lora-ga", factors)


METHOD = register(
    Method(
        name="lora-ga",
        solve=solve,
        statistics=FULL_STATISTICS,
        options=LoraGAOptions,
        offsets_base_weight=True,
        check=check,
    )
)
