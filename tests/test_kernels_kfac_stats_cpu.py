"""Z's lower triangle by the core's OpenBLAS dsyrk (``kernels/kfac_stats_cpu.py``,
``csrc/gram_cpu.cpp``) against the float64 formula ``Σ_t m_t a_t a_tᵀ`` computed here.

Tolerance: the sums are float64 on both sides, in different orders; the difference is
rounding, ``≲ T·ε64`` relative to ``Σ_t m_t |a_ti||a_tj|``, so ``1e-12`` of the largest
entry of that sum (a dropped or doubled row, a wrong block or a wrong triangle is
off by O(1)). Entries strictly above the diagonal must be left exactly as they were.
"""

from __future__ import annotations

import pytest
import torch

from lora_da._native import core
from lora_da.kernels import dispatch, kfac_stats, kfac_stats_cpu


def float64_gram(inputs: torch.Tensor, weights) -> torch.Tensor:
    a = inputs.to(torch.float64)
    w = torch.ones(a.shape[0], dtype=torch.float64) if weights is None else weights.to(torch.float64)
    return torch.einsum("t,ti,tj->ij", w, a, a)


def check(start: torch.Tensor, after: torch.Tensor, inputs: torch.Tensor, weights) -> None:
    expected = start + float64_gram(inputs, weights)
    scale = float64_gram(inputs.abs(), None if weights is None else weights.abs()).abs().max().clamp(min=1e-300)
    lower = torch.ones_like(after, dtype=torch.bool).tril()
    assert ((after - expected).abs()[lower] <= 1e-12 * scale).all(), float((after - expected).abs()[lower].max() / scale)
    assert torch.equal(after[~lower], start[~lower])  # strictly above the diagonal: untouched


def weights_of(kind: str, rows: int, generator) -> torch.Tensor:
    if kind == "none":
        return None
    if kind == "mask":
        return (torch.rand(rows, generator=generator) > 0.3).to(torch.float32)
    return torch.rand(rows, generator=generator, dtype=torch.float64) * 3  # fractional


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("rows,d", [(1, 1), (7, 3), (1000, 64), (513, 130), (300, 577), (2048, 200)])
@pytest.mark.parametrize("kind", ["none", "mask", "fractional"])
def test_lower_triangle_matches_float64(threads, rows, d, kind, monkeypatch):
    generator = torch.Generator().manual_seed(rows * 1000 + d)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)  # the workers the kernel is given
    inputs = torch.randn(rows, d, generator=generator) * torch.logspace(0, 3, d)  # columns of very different size
    weights = weights_of(kind, rows, generator)
    start = torch.randn(d, d, generator=generator, dtype=torch.float64)
    after = start.clone()
    kfac_stats_cpu.accumulate_input_factor_lower(after, inputs, weights)
    check(start, after, inputs, weights)


def test_every_block_split_of_the_core():
    """The core called directly with 1..5 workers (q x q blocks, uneven edges) on float64 rows."""
    generator = torch.Generator().manual_seed(3)
    rows, d = 700, 389
    inputs = torch.randn(rows, d, generator=generator, dtype=torch.float64)
    for threads in range(1, 6):
        start = torch.randn(d, d, generator=generator, dtype=torch.float64)
        after = start.clone()
        core().gram_lower_accumulate(after.data_ptr(), inputs.data_ptr(), rows, d, threads)
        check(start, after, inputs, None)


def test_strided_inputs_and_repeated_accumulation():
    generator = torch.Generator().manual_seed(5)
    wide = torch.randn(400, 2 * 150, generator=generator)
    inputs = wide[:, ::2]  # not contiguous
    start = torch.zeros(150, 150, dtype=torch.float64)
    after = start.clone()
    for _ in range(3):
        kfac_stats_cpu.accumulate_input_factor_lower(after, inputs, None)
    check(start, after, torch.cat([inputs] * 3), None)


def test_no_rows_leaves_the_sum_as_it_was():
    start = torch.randn(40, 40, dtype=torch.float64)
    after = start.clone()
    kfac_stats_cpu.accumulate_input_factor_lower(after, torch.empty(0, 40), None)
    assert torch.equal(after, start)


def test_where_it_does_not_apply_the_panel_path_runs():
    """float32 sums, weighted or not: exactly what the panels give."""
    generator = torch.Generator().manual_seed(9)
    inputs = torch.randn(200, 90, generator=generator)
    for weights in (None, torch.rand(200, generator=generator)):
        ours, panels = torch.zeros(90, 90), torch.zeros(90, 90)
        kfac_stats_cpu.accumulate_input_factor_lower(ours, inputs, weights)
        kfac_stats.accumulate_input_factor_lower(panels, inputs, weights)
        assert torch.equal(ours, panels)


def test_the_torch_backend_uses_it_and_the_pass_mirrors_it():
    backend = dispatch.select_backend(torch.device("cpu"), "torch", torch.float32, "auto")
    assert backend.accumulate_input_factor is kfac_stats_cpu.accumulate_input_factor_lower
    generator = torch.Generator().manual_seed(11)
    inputs = torch.randn(300, 70, generator=generator)
    z = torch.zeros(70, 70, dtype=torch.float64)
    backend.accumulate_input_factor(z, inputs, None)
    backend.finalize_input_factor(z)
    torch.testing.assert_close(z, float64_gram(inputs, None), rtol=1e-12, atol=1e-12 * float(z.abs().max()))


def test_bad_sizes_are_refused_by_name():
    z = torch.zeros(4, 4, dtype=torch.float64)
    a = torch.zeros(3, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="gram_lower_accumulate: d must be"):
        core().gram_lower_accumulate(z.data_ptr(), a.data_ptr(), 3, 0, 1)
    with pytest.raises(ValueError, match="gram_lower_accumulate: num_rows must be"):
        core().gram_lower_accumulate(z.data_ptr(), a.data_ptr(), -1, 4, 1)
    with pytest.raises(ValueError, match="gram_lower_accumulate: threads must be"):
        core().gram_lower_accumulate(z.data_ptr(), a.data_ptr(), 3, 4, 0)
    with pytest.raises(ValueError, match="gram_lower_accumulate: null"):
        core().gram_lower_accumulate(0, a.data_ptr(), 3, 4, 1)
    with pytest.raises(ValueError, match=r"input_factor_sum is \(4, 4\), expected \(5, 5\)"):
        kfac_stats_cpu.accumulate_input_factor_lower(z, torch.zeros(3, 5), None)
