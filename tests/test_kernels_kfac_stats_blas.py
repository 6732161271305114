"""``kernels/kfac_stats_blas.py``: Z on its lower triangle by the compiled core's BLAS
(``?syrk`` / ``?gemmt``), against a float64 recomputation from the formula
``Z = start + Σ_batches aᵀ diag(m) a``, on random and ragged shapes.

Bound: every entry is a sum of ``T`` products added to the start, so its rounding error
is at most ``γ_{T+2}`` (in the accumulator's dtype) times the same sum of magnitudes, per
batch; the float64 oracle's own rounding is far below that for float32 and counted for
float64 by taking ``γ`` of twice the length.
"""

from __future__ import annotations

import pytest
import torch
from kernel_checks import assert_within, gamma, random_inputs, token_mask

from lora_da._native import core
from lora_da.kernels import kfac_stats, kfac_stats_blas

# d_in 1 and 2, primes, across OpenBLAS's blocking sizes; T from 0 (an empty batch) to a few hundred
SHAPES = [(1, 1), (5, 2), (0, 9), (37, 13), (200, 129), (64, 300), (3, 257), (301, 96)]
MASKS = ["none", "holes", "fractional", "all_zero"]


def _oracle(start: torch.Tensor, batches) -> tuple:
    """float64 ``start + Σ aᵀ diag(m) a`` and the sum of magnitudes (for the rounding bound)."""
    expected = start.to(torch.float64).clone()
    magnitude = start.to(torch.float64).abs().clone()
    for a, weights in batches:
        a = a.to(torch.float64)
        m = torch.ones(a.shape[0], dtype=torch.float64) if weights is None else weights.to(torch.float64)
        expected += (a * m[:, None]).T @ a
        magnitude += (a.abs() * m.abs()[:, None]).T @ a.abs()
    return expected, magnitude


@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_lower_triangle_matches_float64(shape, dtype, mask_kind):
    num_tokens, d_in = shape
    seed = num_tokens * 1000 + d_in
    generator = torch.Generator().manual_seed(seed)
    start = torch.randn(d_in, d_in, generator=generator, dtype=torch.float64)
    start = (start @ start.T).to(dtype)  # as after earlier batches (only its lower triangle is read)
    z = start.clone()
    batches = []
    for batch in range(2):  # two batches: the accumulation adds, it does not overwrite
        # float32 activations (upcast for a float64 Z, the default pass), then the accumulator's own dtype
        a = random_inputs(num_tokens, d_in, torch.float32 if batch == 0 else dtype, seed + batch, device="cpu")
        weights = token_mask(num_tokens, mask_kind, seed + batch, device="cpu")
        kfac_stats_blas.accumulate_input_factor(z, a, weights)
        batches.append((a, weights))
    upper = torch.ones(d_in, d_in, dtype=torch.bool).triu(1)
    assert torch.equal(z[upper], start[upper]), "the strictly upper triangle must not be written"
    expected, magnitude = _oracle(start, batches)
    lower = ~upper
    n = 2 * (num_tokens + 2)
    bound = 2 * gamma(n, dtype) * magnitude
    assert_within(z.to(torch.float64)[lower], expected[lower], bound[lower], f"Z's lower triangle ({dtype}, {mask_kind})")
    if mask_kind == "all_zero" or num_tokens == 0:
        assert torch.equal(z, start), "an all-zero mask or an empty batch must leave Z exactly as it was"


def test_mirrored_result_is_the_reference_sum():
    """After the end-of-pass mirror: symmetric and equal to the reference's full ``addmm``
    (float64 accumulator, float32 activations upcast, as the default pass runs)."""
    a = random_inputs(300, 77, torch.float32, 3, device="cpu")
    weights = token_mask(300, "holes", 3, device="cpu")
    z = torch.zeros(77, 77, dtype=torch.float64)
    kfac_stats_blas.accumulate_input_factor(z, a, weights)
    kfac_stats.mirror_lower_triangle(z)
    full = torch.zeros(77, 77, dtype=torch.float64)
    kfac_stats.accumulate_input_factor(full, a, weights)
    assert torch.equal(z, z.T)
    torch.testing.assert_close(z, full, rtol=1e-13, atol=1e-12)  # float64: the two orders of addition


def test_strided_inputs_and_16_bit_activations():
    """A non-contiguous (transposed) input and bf16 activations give the sums of the same values."""
    generator = torch.Generator().manual_seed(11)
    storage = torch.randn(40, 90, generator=generator)
    a = storage.T  # (90, 40), not contiguous
    z = torch.zeros(40, 40, dtype=torch.float64)
    kfac_stats_blas.accumulate_input_factor(z, a, None)
    expected, _ = _oracle(torch.zeros(40, 40), [(a, None)])
    torch.testing.assert_close(z.tril(), expected.tril(), rtol=1e-12, atol=1e-12)
    b = a.to(torch.bfloat16)
    z32 = torch.zeros(40, 40)
    kfac_stats_blas.accumulate_input_factor(z32, b, None)
    expected, magnitude = _oracle(torch.zeros(40, 40), [(b.to(torch.float64), None)])
    lower = torch.ones(40, 40, dtype=torch.bool).tril()
    assert_within(z32[lower], expected[lower], 2 * gamma(2 * 92) * magnitude[lower], "bf16 activations")


def test_what_blas_cannot_take_goes_the_torch_way(monkeypatch):
    """A strided accumulator (or any other device) takes the panel path; the BLAS call never sees it."""
    calls = []
    monkeypatch.setattr(kfac_stats, "accumulate_input_factor_lower", lambda *args: calls.append(args))
    wide = torch.zeros(30, 60, dtype=torch.float64)
    kfac_stats_blas.accumulate_input_factor(wide[:, :30], torch.randn(8, 30), None)
    assert len(calls) == 1
    assert not kfac_stats_blas.applies(wide[:, :30])
    assert kfac_stats_blas.applies(torch.zeros(4, 4)) and not kfac_stats_blas.applies(torch.zeros(4, 4, dtype=torch.float16))


def test_bad_shapes_name_what_is_wrong():
    z = torch.zeros(6, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"inputs must be \(T, 6\)"):
        kfac_stats_blas.accumulate_input_factor(z, torch.randn(4, 5), None)
    with pytest.raises(ValueError, match=r"token_weights must be \(4,\)"):
        kfac_stats_blas.accumulate_input_factor(z, torch.randn(4, 6), torch.ones(3))


def test_core_checks_its_arguments():
    z = torch.zeros(3, 3, dtype=torch.float64)
    rows = torch.ones(2, 3, dtype=torch.float64)
    call = core().accumulate_gram_lower
    with pytest.raises(ValueError, match="dtype must be 'float32' or 'float64'"):
        call(z.data_ptr(), rows.data_ptr(), 0, 2, 3, "float16", 1)
    with pytest.raises(ValueError, match="dim must be"):
        call(z.data_ptr(), rows.data_ptr(), 0, 2, 0, "float64", 1)
    with pytest.raises(ValueError, match="num_rows must be"):
        call(z.data_ptr(), rows.data_ptr(), 0, 2**31, 3, "float64", 1)
    with pytest.raises(ValueError, match="threads must be"):
        call(z.data_ptr(), rows.data_ptr(), 0, 2, 3, "float64", 0)
    with pytest.raises(ValueError, match="null"):
        call(0, rows.data_ptr(), 0, 2, 3, "float64", 1)
    assert torch.equal(z, torch.zeros(3, 3, dtype=torch.float64)), "a refused call must not write"

