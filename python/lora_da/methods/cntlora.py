"""``cntlora``: ConsNoTrainLoRA, **our reading** of its published description (docs/math.md §6.6).

A closed-form weight update from ``W`` and the forward activation statistics
(``Z`` only: forward passes, no backward), with a per-layer rank. The paper
itself was not available; the criterion below is ours, stated exactly in
:func:`cntlora_factors`. The base weight is unchanged; the factors are stored
for ``s = 1`` (divided by ``√s`` on apply).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch

from ..layers import is_expert_slice, weight_matrix
from .base import FORWARD_STATISTICS, Method, Solution, SolveContext, register, solve_each
from .linalg import signed_pairs, svd, symmetric_powers


@dataclass(frozen=True)
class CntLoraOptions:
    """``energy``: the share τ of ΔW's spectral energy a layer's rank must hold;
    ``shrinkage``: ρ of ``Ĉ = (1−ρ)C + ρI``. Both our choices."""

    energy: float = 0.9
    shrinkage: float = 0.1

    def __post_init__(self) -> None:
        if not 0.0 < self.energy <= 1.0:
            raise ValueError(f"energy must lie in (0, 1], got {self.energy}")
        if not 0.0 < self.shrinkage <= 1.0:
            raise ValueError(f"shrinkage must lie in (0, 1], got {self.shrinkage}")


def cntlora_delta(weight: torch.Tensor, input_factor_raw: torch.Tensor, shrinkage: float) -> torch.Tensor:
    """CNTLoRA's closed-form weight estimate ``ΔW = W (T − I)`` (our reading, see :func:`cntlora_factors`)."""
    z = input_factor_raw.to(torch.float64)
    z = 0.5 * (z + z.T)
    d = torch.diagonal(z).clamp(min=0.0)
    mean = float(d.mean())
    if mean <= 0.0:
        raise FloatingPointError("the module's inputs are all zero")
    dead = d <= 1e-12 * mean
    d = torch.where(dead, torch.full_like(d, mean), d)
    root = d.sqrt()
    corr = z / root[:, None] / root[None, :]
    corr[dead, :] = 0.0
    corr[:, dead] = 0.0
    corr.fill_diagonal_(1.0)  # a correlation matrix; dead features stay uncorrelated and untouched
    identity = torch.eye(z.shape[0], dtype=torch.float64, device=z.device)
    shrunk = (1.0 - shrinkage) * corr + shrinkage * identity  # Ĉ, eigenvalues >= ρ
    z_hat = root[:, None] * shrunk * root[None, :]  # Ẑ = D^{1/2} Ĉ D^{1/2}
    floor = shrinkage * float(d.min()) * 1e-3  # Ẑ's eigenvalues are >= ρ·min(d); guard rounding only
    z_half, z_inv_half = symmetric_powers(z_hat, (0.5, -0.5), floor)
    # T = Ẑ^{-1/2} (Ẑ^{1/2} D Ẑ^{1/2})^{1/2} Ẑ^{-1/2}: symmetric, T Ẑ T = D
    (middle,) = symmetric_powers((z_half * d[None, :]) @ z_half, (0.5,))
    transport = z_inv_half @ middle @ z_inv_half
    return weight.to(torch.float64) @ (transport - identity)


def cntlora_factors(
    weight: torch.Tensor, input_factor_raw: torch.Tensor, max_rank: int, energy: float, shrinkage: float
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ConsNoTrainLoRA, **our reading** of its published description (the paper was not available).

    Domain-shift constraint: the adapted layer, fed the fine-tuning activations,
    should produce the output second moments that the pre-trained ``W`` produces
    for pre-training-like activations. Pre-training activations are not
    available; we model their second moment as ``Z_pt = D = diag(Z)`` (the same
    per-feature energies, no correlations: the correlations are the shift).
    With ``C = D^{-1/2} Z D^{-1/2}`` (fine-tuning correlations, ``Z`` from the
    forward pass, undamped) shrunk towards the prior, ``Ĉ = (1−ρ)C + ρI``
    (``shrinkage`` ρ, default 0.1, our choice) and ``Ẑ = D^{1/2} Ĉ D^{1/2}``, the
    constraint ``(W+ΔW) Ẑ (W+ΔW)ᵀ = W D Wᵀ`` with ``W + ΔW = W T`` holds for
    every ``T`` with ``T Ẑ Tᵀ = D``. Of those we take the one that moves the
    activations least, ``min E‖(T − I)x‖²`` over ``x ~ (0, Ẑ)``: the optimal
    transport map between the two Gaussian moments,

        ``T = Ẑ^{-1/2} (Ẑ^{1/2} D Ẑ^{1/2})^{1/2} Ẑ^{-1/2}``,  ``ΔW = W (T − I)``

    (symmetric positive definite). An earlier reading, ``T = D^{1/2}Ĉ^{-1/2}D^{-1/2}``,
    satisfies the same constraint but scales cross-feature terms by ``√(d_i/d_j)``;
    on SmolLM2 it gave ``‖ΔW‖ ≈ 60‖W‖`` and a held-out loss of 17 at init.
    ``ΔW`` depends only on W and forward activation statistics (no backward pass).
    Features with no energy are left untouched. ``ΔW = U S Vᵀ`` is decomposed
    with a per-layer rank ``k = min(r_max, max(1, min{k : Σ_{i≤k} S_i² ≥ τ Σ_i S_i²}))``
    (spectral-energy criterion, ``energy`` τ, default 0.9, our choice):
    ``B = U_k √S_k``, ``A = √S_k V_kᵀ`` for ``s = 1`` (so ``s·B·A = ΔW_k``);
    the base weight is unchanged. Returns (A, B, S[:r_max]).
    """
    delta = cntlora_delta(weight, input_factor_raw, shrinkage)
    u, s, v = svd(delta)
    energies = s.square()
    total = float(energies.sum())
    if total == 0.0:
        k = 1
    else:
        cumulative = torch.cumsum(energies, 0) / total
        k = int((cumulative < energy - 1e-12).sum()) + 1
    k = max(1, min(max_rank, k))
    u_k, v_k = signed_pairs(u[:, :k], v[:, :k])
    root = s[:k].sqrt()
    return root[:, None] * v_k.T, u_k * root[None, :], s[:max_rank]


def solve(context: SolveContext) -> Solution:
    options = context.options

    def factors(name: str) -> tuple:
        weight = weight_matrix(name, context.targets[name])
        lora_A, lora_B, values = cntlora_factors(
            weight, context.statistics.input_factor(name), context.settings.rank, options.energy, options.shrinkage
        )
        return lora_A, lora_B, values, float(values[0])

    return solve_each(context, "cntlora", factors)


def check(targets, rank: int, options: CntLoraOptions) -> None:
    """cntlora picks a rank per module; the experts of a fused parameter share one PEFT layer and one rank."""
    experts = [name for name, target in targets.items() if is_expert_slice(target)]
    if experts:
        raise ValueError(
            f"cntlora picks a rank per module, but the experts of a fused parameter (e.g. '{experts[0]}') share one "
            "PEFT target_parameters layer and one rank: leave the experts out of target_modules for cntlora"
        )


METHOD = register(
    Method(
        name="cntlora",
        solve=solve,
        statistics=FORWARD_STATISTICS,
        options=CntLoraOptions,
        reads_weight=True,
        unit_scaling=True,
        check=check,
    )
)
