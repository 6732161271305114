"""The CPU statistics path (``kernels/kfac_stats.py``): Z on its lower triangle by column
panels, mirrored at the end of the pass, against the float64 formula."""

from __future__ import annotations

import pytest
import torch

from lora_da.kernels import dispatch, kfac_stats

UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float64: 2.0**-53}


def _weights(num_tokens: int, kind: str, generator: torch.Generator):
    if kind == "none":
        return None
    if kind == "holes":
        return (torch.rand(num_tokens, generator=generator) > 0.35).to(torch.float32)
    return torch.rand(num_tokens, generator=generator) * 2  # fractional weights


# d_in below, at, and across panel boundaries (PANEL_WIDTH = 128), none a multiple of it but one
@pytest.mark.parametrize("shape", [(77, 45), (130, 128), (200, 129), (64, 300), (3, 257)], ids=str)
@pytest.mark.parametrize("kind", ["none", "holes", "fractional"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_lower_panels_then_mirror_match_float64(shape, kind, dtype):
    num_tokens, d_in = shape
    generator = torch.Generator().manual_seed(num_tokens * 1000 + d_in)
    a = torch.randn(num_tokens, d_in, generator=generator, dtype=torch.float64).to(dtype).to(torch.float64)
    weights = _weights(num_tokens, kind, generator)
    start = torch.randn(d_in, d_in, generator=generator, dtype=torch.float64)
    start = start @ start.T
    start = ((start + start.T) / 2).to(dtype).to(torch.float64)  # exactly symmetric, as after earlier batches

    z = start.to(dtype).clone()
    kfac_stats.accumulate_input_factor_lower(z, a.to(dtype), weights)
    kfac_stats.accumulate_input_factor_lower(z, a.to(dtype), weights)  # two batches
    # blocks above the diagonal panels are not touched before the mirror
    for begin in range(0, d_in, kfac_stats.PANEL_WIDTH):
        end = min(begin + kfac_stats.PANEL_WIDTH, d_in)
        assert torch.equal(z[begin:end, end:], start.to(dtype)[begin:end, end:])
    kfac_stats.mirror_lower_triangle(z)
    assert torch.equal(z, z.T), "the mirror must leave Z exactly symmetric"

    m = torch.ones(num_tokens, dtype=torch.float64) if weights is None else weights.to(torch.float64)
    expected = start + 2 * (a * m[:, None]).T @ a
    magnitude = start.abs() + 2 * (a.abs() * m[:, None]).T @ a.abs()
    n = 2 * (num_tokens + 4)  # the float64 oracle rounds too
    bound = n * UNIT_ROUNDOFF[dtype] / (1 - n * UNIT_ROUNDOFF[dtype]) * magnitude + 1e-300
    excess = ((z.to(torch.float64) - expected).abs() / bound).max().item()
    assert excess <= 1.0, f"error reaches {excess:.3g} x the rounding bound"


def test_lower_panels_agree_with_the_full_reference():
    """Same sums as the reference's single addmm, up to float32 rounding of the two orders."""
    generator = torch.Generator().manual_seed(5)
    a = torch.randn(256, 200, generator=generator)
    weights = (torch.rand(256, generator=generator) > 0.5).to(torch.float32)
    full = torch.zeros(200, 200)
    kfac_stats.accumulate_input_factor(full, a, weights)
    lower = torch.zeros(200, 200)
    kfac_stats.accumulate_input_factor_lower(lower, a, weights)
    kfac_stats.mirror_lower_triangle(lower)
    torch.testing.assert_close(lower, full, rtol=1e-5, atol=1e-4)


def test_cpu_backend_uses_the_lower_panels():
    backend = dispatch.select_backend(torch.device("cpu"), "auto", torch.float32)
    assert backend.accumulate_input_factor is kfac_stats.accumulate_input_factor_lower
    assert backend.finalize_input_factor is kfac_stats.mirror_lower_triangle
