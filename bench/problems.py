"""Test and benchmark problems with known eigenvectors."""

from __future__ import annotations


import torch


def slowly_decaying_spectrum(n: int, *, scale: float = 1.0, dtype=torch.float64) -> torch.Tensor:
    """``λ_i = −exp(−i/ρ)``, ``ρ = n/8``, ascending: the smallest eigenvalues
    decay slowly (relative gap ``λ_{k+1} − λ_k ≈ 8/n`` of the spread), the
    shape of Ω's bottom end when Δ̂'s singular values decay slowly."""
    index = torch.arange(n, dtype=torch.float64)
    return (-scale * torch.exp(-index / (n / 8.0))).to(dtype)


def random_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=generator))
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


def matrices_with_spectrum(spectra: torch.Tensor, *, seed: int = 0, distinct_bases: int | None = None):
    """``A_b = Q_b diag(spectra[b]) Q_bᵀ`` (float64) and the bases ``Q_b``.

    ``distinct_bases`` limits how many random orthogonal bases are drawn (they
    are reused cyclically) to keep set-up time down for large n."""
    batch, n = spectra.shape
    generator = torch.Generator().manual_seed(seed)
    count = batch if distinct_bases is None else min(batch, distinct_bases)
    bases = [random_orthogonal(n, generator) for _ in range(count)]
    q = torch.stack([bases[b % count] for b in range(batch)])
    a = (q * spectra.unsqueeze(-2)) @ q.transpose(-1, -2)
    return 0.5 * (a + a.transpose(-1, -2)), q


def largest_principal_angle(exact: torch.Tensor, approx: torch.Tensor) -> torch.Tensor:
    """Largest principal angle (radians) between the column spans of ``exact``
    (orthonormal, (*B, n, k)) and ``approx`` ((*B, n, k)), computed from the
    sine (accurate for tiny angles): ``asin ‖(I − Q Qᵀ) V‖₂`` with Q an
    orthonormal basis of ``approx``."""
    exact = exact.to(torch.float64)
    q, _ = torch.linalg.qr(approx.to(torch.float64))
    rest = exact - q @ (q.transpose(-1, -2) @ exact)
    sine = torch.linalg.matrix_norm(rest, ord=2).clamp(max=1.0)
    return torch.asin(sine)
