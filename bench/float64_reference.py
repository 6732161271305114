"""An independent float64 reference for LoRA-DA (docs/math.md §2-§3), from plain PyTorch.

Used by ``bench/accuracy_smollm2.py`` and ``tests/test_accuracy_reference.py``.
Nothing of ``lora_da`` is imported: the statistics are accumulated by our own
hooks and the factors come from a dense ``torch.linalg.eigh`` of the formed Ω.

* :func:`float64_statistics` — one hooked forward+backward pass of the (float32)
  model: each target's input ``a`` and output gradient ``g`` are upcast to
  float64 *before* any product, so ``Z = (1/|T|) Σ a aᵀ``, ``y = (1/|T|) Σ g²``
  (tokens of the attention mask) and ``G = (1/n) Σ gᵀa`` (every token) carry no
  float32 rounding of their own. ``g`` is the gradient of the sum of each sample's
  mean next-token cross-entropy (the library's default loss). Modules fed the same
  input tensor share one ``Z``.
* :func:`reference_bases` — per module, ``A₀``: the ``r`` eigenvectors of
  ``Ω = −αΔ̂Δ̂ᵀ + βc(Z+λI)⁻¹`` for its smallest eigenvalues, with
  ``Δ = −(Z+λI)⁻¹Gᵀdiag(1/(y+λ))``, ``σ = ‖Δ‖₂``, ``Δ̂ = Δ/σ``,
  ``c = Σ1/(y+λ)/N/σ²``, all float64, at exactly the λ asked for (no escalation:
  a ``Z + λI`` that is not positive definite is reported, not repaired).
* :func:`largest_angle_degrees` — the largest principal angle between two column spans.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ReferenceStatistics:
    """Float64 Z (per input group), y and G (per module), already normalized."""

    input_factor: Dict[str, torch.Tensor] = field(default_factory=dict)  # keyed by the group's first module
    group_of: Dict[str, str] = field(default_factory=dict)  # module -> its group's first module
    output_factor_diag: Dict[str, torch.Tensor] = field(default_factory=dict)
    gradient: Dict[str, torch.Tensor] = field(default_factory=dict)
    num_tokens: int = 0
    num_samples: int = 0


def _per_sample_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    shifted = F.pad(labels[:, 1:], (0, 1), value=-100)
    losses = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), shifted.reshape(-1), ignore_index=-100, reduction="none"
    ).view(shifted.shape)
    counts = (shifted != -100).sum(dim=1)
    return (losses.sum(dim=1) / counts.clamp(min=1))[counts > 0]


def float64_statistics(model: nn.Module, batches: Iterable[dict], names: List[str]) -> ReferenceStatistics:
    """Z, y, G in float64 from ``model``'s own activations (see the module doc).
    ``batches``: dicts with ``input_ids``, ``labels`` and optionally ``attention_mask``."""
    modules = dict(model.named_modules())
    stats = ReferenceStatistics()
    sums_z: Dict[str, torch.Tensor] = {}
    sums_y: Dict[str, torch.Tensor] = {}
    sums_g: Dict[str, torch.Tensor] = {}
    state: dict = {}

    def forward_hook(name):
        def hook(module, args, output):
            a = args[0].detach().reshape(-1, args[0].shape[-1])
            mask = state["mask"]
            owner = state["inputs"].setdefault(args[0].data_ptr(), name)
            stats.group_of.setdefault(name, owner)
            if owner == name:
                a64 = a.to(torch.float64) * mask.unsqueeze(1)
                z = a64.T @ a64
                sums_z[name] = sums_z[name] + z if name in sums_z else z

            def grad_hook(grad):
                g64 = grad.detach().reshape(-1, grad.shape[-1]).to(torch.float64)
                y = (g64 * g64 * mask.unsqueeze(1)).sum(0)
                gradient = g64.T @ a.to(torch.float64)
                sums_y[name] = sums_y[name] + y if name in sums_y else y
                sums_g[name] = sums_g[name] + gradient if name in sums_g else gradient

            output.register_hook(grad_hook)
            return None

        return hook

    handles = [modules[name].register_forward_hook(forward_hook(name)) for name in names]
    saved = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in saved:
            p.requires_grad_(False)
        embed = model.get_input_embeddings()
        for batch in batches:
            ids = batch["input_ids"]
            attention = batch.get("attention_mask")
            mask = torch.ones(ids.numel(), dtype=torch.float64) if attention is None else attention.reshape(-1).to(torch.float64)
            state.update(mask=mask, inputs={})
            embeds = embed(ids).detach().requires_grad_(True)
            logits = model(inputs_embeds=embeds, attention_mask=attention).logits
            losses = _per_sample_losses(logits, batch["labels"])
            losses.sum().backward()
            stats.num_tokens += int(mask.sum())
            stats.num_samples += int(losses.numel())
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in saved:
            p.requires_grad_(flag)
    stats.input_factor = {name: z / stats.num_tokens for name, z in sums_z.items()}
    stats.output_factor_diag = {name: y / stats.num_tokens for name, y in sums_y.items()}
    stats.gradient = {name: g / stats.num_samples for name, g in sums_g.items()}
    return stats


@dataclass
class ReferenceModule:
    """One module's float64 answer."""

    input_basis: Optional[torch.Tensor]  # A₀ (d_in x r); None when Z + λI is not positive definite
    positive_definite: bool  # Cholesky of Z + λI succeeded in float64
    input_factor_min: float  # λ_min(Z) (undamped)
    input_factor_max: float  # λ_max(Z)


def reference_bases(
    stats: ReferenceStatistics,
    *,
    rank: int,
    alpha: float,
    beta: float,
    damping: float,
    train_size: int,
) -> Dict[str, ReferenceModule]:
    """``A₀`` per module from ``stats`` (see the module doc); one factorization of Z per group."""
    by_group: Dict[str, tuple] = {}
    result: Dict[str, ReferenceModule] = {}
    for name, owner in stats.group_of.items():
        if owner not in by_group:
            z = stats.input_factor[owner]
            z = 0.5 * (z + z.T)
            spectrum = torch.linalg.eigvalsh(z)
            damped = z + damping * torch.eye(z.shape[0], dtype=torch.float64)
            cholesky, info = torch.linalg.cholesky_ex(damped)
            inverse = torch.cholesky_inverse(cholesky) if int(info) == 0 else None
            by_group[owner] = (cholesky, inverse, float(spectrum[0]), float(spectrum[-1]))
        cholesky, inverse, low, high = by_group[owner]
        if inverse is None:
            result[name] = ReferenceModule(None, False, low, high)
            continue
        inverse_output = 1.0 / (stats.output_factor_diag[name] + damping)
        delta = -torch.cholesky_solve(stats.gradient[name].T.contiguous(), cholesky) * inverse_output.unsqueeze(0)
        sigma = float(torch.linalg.matrix_norm(delta, ord=2))
        delta_hat = delta / sigma
        variance_scale = float(inverse_output.sum()) / train_size / sigma**2
        omega = -alpha * (delta_hat @ delta_hat.T) + beta * variance_scale * inverse
        _, vectors = torch.linalg.eigh(0.5 * (omega + omega.T))
        result[name] = ReferenceModule(vectors[:, :rank], True, low, high)
    return result


def largest_angle_degrees(exact: torch.Tensor, approx: torch.Tensor) -> float:
    """Largest principal angle (degrees) between the column spans of ``exact`` and
    ``approx`` (both ``n x k``), from the sine (accurate for tiny angles)."""
    q_exact, _ = torch.linalg.qr(exact.to(torch.float64))
    q_approx, _ = torch.linalg.qr(approx.to(torch.float64))
    rest = q_exact - q_approx @ (q_approx.T @ q_exact)
    return math.degrees(math.asin(min(float(torch.linalg.matrix_norm(rest, ord=2)), 1.0)))
