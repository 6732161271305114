"""``fisher-subspace``: Fisher-weighted sensitivity, **our reading** of its published description
(docs/math.md §6.7).

Directions of the largest loss decrease per unit of the K-FAC Fisher metric
(``F ≈ Z ⊗ diag(y)``), scaled like LoRA-DA (unit spectral norm, ``/γ``); reads
G, Z and y. The paper was not available; the criterion is ours, stated exactly
in :func:`fisher_subspace_factors`. The base weight is unchanged.
"""

from __future__ import annotations

import math
from typing import Dict, Tuple

import torch

from ..module_init import make_module_init
from .base import FULL_STATISTICS, Method, PhaseClock, Solution, SolveContext, register
from .linalg import signed_pairs, svd
from .lora_da_reference import InputFactor, damping_escalations, prepare_input_factor, report_damping_escalations


def fisher_subspace_factors(
    gradient: torch.Tensor,
    cholesky: torch.Tensor,
    output_factor_diag: torch.Tensor,
    rank: int,
    damping: float,
    gamma: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Fisher-subspace initialization, **our reading** of its published description.

    K-FAC Fisher of the module under the target data: ``F ≈ Z ⊗ diag(y)``, so a
    perturbation ΔW changes the predictions by the Fisher norm
    ``‖ΔW‖²_F = tr(diag(y+λ) ΔW Z ΔWᵀ)`` (``Z`` damped as in LoRA-DA). The
    second-order model of the loss is ``⟨G, ΔW⟩ + ½‖ΔW‖²_F``. Over rank-r
    updates it is minimized (Eckart–Young after the change of variables
    ``X = diag(y+λ)^{1/2} ΔW L``, ``Z = L Lᵀ``) by

        ``ΔW* = −diag(y+λ)^{-1/2} [M]_r L^{-1}``,  ``M = diag(y+λ)^{-1/2} G L^{-T}``

    where ``[M]_r`` keeps the r largest singular triplets of M: the LoRA
    directions are those of largest Fisher-weighted sensitivity ``σ_i(M)²``
    (each is the loss decrease ``½σ_i²`` its direction buys per the Fisher
    metric). The result does not depend on the choice of the factor L. The
    factors split ``ΔW*`` like LoRA-One, scaled like LoRA-DA (our choice):
    ``ΔW* = U' S' V'ᵀ``, ``B = U' √(S'/S'_1)/√γ``, ``A = √(S'/S'_1) V'ᵀ/√γ``, so
    ``B·A = ΔW*/(‖ΔW*‖₂ γ)``; base unchanged. Returns (A, B, σ(M)[:r], ‖ΔW*‖₂).
    """
    y_root = (output_factor_diag.to(torch.float64) + damping).rsqrt()  # diag(y+λ)^{-1/2}
    g = gradient.to(torch.float64)
    # M = Y^{-1/2} G L^{-T}: solve L Xᵀ = (Y^{-1/2} G)ᵀ
    m = torch.linalg.solve_triangular(cholesky, (y_root[:, None] * g).T, upper=False).T
    p, sig, q = svd(m)
    if float(sig[0]) == 0.0:
        raise FloatingPointError("the gradient is exactly zero")
    left = y_root[:, None] * (p[:, :rank] * sig[:rank][None, :])  # d_out x r
    right = torch.linalg.solve_triangular(cholesky.T, q[:, :rank], upper=True)  # L^{-T} Q_r: d_in x r
    q1, r1 = torch.linalg.qr(left)
    q2, r2 = torch.linalg.qr(right)
    core_u, core_s, core_v = svd(-(r1 @ r2.T))
    u_out, v_in = signed_pairs(q1 @ core_u, q2 @ core_v)
    norm = float(core_s[0])
    root = (core_s / norm).sqrt() / math.sqrt(gamma)
    return root[:, None] * v_in.T, u_out * root[None, :], sig[:rank], norm


def solve(context: SolveContext) -> Solution:
    """Z is damped and factored once per input group (docs/math.md §5.1), as for LoRA-DA;
    the groups whose damping was raised give one warning (``report_damping_escalations``)."""
    stats, settings = context.statistics, context.settings
    clock = PhaseClock(context.timings)
    factors: Dict[int, InputFactor] = {}
    for name in context.names:
        index = stats.modules[name].group_index
        if index not in factors:
            factors[index] = prepare_input_factor(stats.input_factor(name), settings.damping, name)
    clock.lap("factor_prep")
    result = {}
    for name in context.names:
        factor = factors[stats.modules[name].group_index]
        lora_A, lora_B, values, norm = fisher_subspace_factors(
            stats.gradient(name), factor.cholesky, stats.output_factor_diag(name), settings.rank,
            settings.damping, settings.gamma,
        )
        result[name] = make_module_init(
            name, lora_A, lora_B, values, norm, damping=factor.damping, input_group=context.input_group(name)
        )
    members = {group: stats.groups[group].members for group in factors}
    report_damping_escalations(damping_escalations(factors, members, settings.damping, stats.group_tokens()))
    return Solution(result, "fisher-subspace (torch.linalg, float64)")


METHOD = register(
    Method(
        name="fisher-subspace",
        solve=solve,
        statistics=FULL_STATISTICS,
    )
)
