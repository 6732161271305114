"""K-FAC statistics accumulation (``kernels/kfac_stats.py``, ``kernels/kfac_stats_triton.py``).

* Triton kernels vs the plain-PyTorch reference run in float64 on the same inputs.
  Without CUDA they run under the Triton interpreter (``TRITON_INTERPRET=1``, set
  in ``conftest.py``) on small ragged shapes (the interpreter executes every
  program in Python); ``@pytest.mark.cuda`` tests run the compiled, autotuned
  kernels at larger shapes.
* The split over tokens (``num_splits``: partial sums added in split order) vs float64,
  and bitwise equal on a second run; the split policy; element offsets past 2³¹ (views
  with a 2³⁰ + 64 row stride over virtual memory, in a child process).
* The reference's CPU fast path (Z on its lower triangle by column panels,
  mirrored at the end of the pass) and its output statistics vs the float64 formula.

Tolerances (``γ_n`` as in ``kernel_checks``). The only error left after comparing
with float64 on the same rounded inputs is the kernels' fp32 arithmetic:

* bf16/fp16 inputs: each product of two inputs is exact in fp32 (8+8 or 11+11
  significant bits ≤ 24), so only the ``T`` additions round: ``γ_T``;
* fp32 inputs: IEEE fp32 products (no TF32) add one rounding each: ``γ_{T+1}``;
* y squares the fp32-converted gradient: one more rounding for every dtype;
* in-place accumulation onto a non-zero sum adds one rounding more.

Hence ``γ_{T+2}`` elementwise against ``Σ_t m_t |a_ti| |a_tj|`` (and the like for
y and G): a bound, and still ~1e-5 relative, so one dropped or doubled token, a
wrong mask or a wrong tile fails it. Fractional token weights: the Triton kernels
apply ``m_t`` to one operand *in the input precision* (documented in
``kfac_stats_triton``), one rounding of relative size ``u_input`` (2⁻⁸ for bf16,
2⁻¹¹ for fp16, 2⁻²⁴ for fp32) before the exact product: the bound gains ``u_input``.
All-zero masks must leave Z and y exactly as they were.
"""

from __future__ import annotations

import zlib

import pytest
import torch
from kernel_checks import (
    DEVICE,
    INTERPRETING,
    MASK_KINDS,
    STATISTICS_INPUT_DTYPES,
    UNIT_ROUNDOFF,
    assert_within,
    gamma,
    import_triton_module,
    run_isolated,
    random_inputs,
    token_mask,
)

from lora_da.kernels import kfac_stats, triton_launch

# (num_tokens, d_in, d_out): nothing a multiple of 16 except where marked; interpreter tiles are 32.
RAGGED_SHAPES = [
    (77, 45, 37),
    (130, 70, 19),  # several token blocks and 3x3 tiles
    (5, 3, 7),  # fewer tokens than one block, d < 16
    (64, 48, 33),  # T multiple of the tile, d multiple of 16 (not of 32)
]


@pytest.fixture(scope="module")
def kernels():
    return import_triton_module("kfac_stats_triton")


def _seed(*key) -> int:
    return zlib.crc32(repr(key).encode()) % 1000


def _weights64(m, num_tokens, device):
    return torch.ones(num_tokens, dtype=torch.float64, device=device) if m is None else m.to(torch.float64)


def _weight_rounding(dtype, mask_kind) -> float:
    """Relative rounding of ``m_t a_t`` in the input precision (fractional weights only)."""
    return UNIT_ROUNDOFF[dtype] if mask_kind == "fractional" else 0.0


def _symmetric_start(d_in, seed):
    """A non-zero, exactly symmetric sum, as after earlier batches."""
    start = random_inputs(d_in, d_in, torch.float32, seed)
    start = start @ start.T
    return (start + start.T) / 2


# ---------------------------------------------------------------------------------------
# Triton: Z += aᵀ diag(m) a
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", STATISTICS_INPUT_DTYPES, ids=str)
@pytest.mark.parametrize("shape", RAGGED_SHAPES, ids=str)
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
def test_input_factor_matches_float64(kernels, dtype, shape, mask_kind):
    num_tokens, d_in, _ = shape
    seed = _seed(dtype, shape, mask_kind)
    a = random_inputs(num_tokens, d_in, dtype, seed)
    m = token_mask(num_tokens, mask_kind, seed)
    start = _symmetric_start(d_in, seed + 2)

    z = start.clone()
    kernels.accumulate_input_factor(z, a, m)
    # Only upper-triangle tiles are touched before the pass ends.
    if INTERPRETING and d_in > triton_launch.INTERPRETER_BLOCK:
        _assert_lower_tiles_untouched(z, start, triton_launch.INTERPRETER_BLOCK)
    kernels.finalize_input_factor(z)
    assert torch.equal(z, z.T), "finalize must leave Z exactly symmetric"
    if mask_kind == "all_zero":
        assert torch.equal(z, start), "an all-zero mask must leave Z exactly as it was"

    a64 = a.to(torch.float64)
    m64 = _weights64(m, num_tokens, a.device)
    expected = start.to(torch.float64).clone()
    kfac_stats.accumulate_input_factor(expected, a64, m64)
    magnitude = start.to(torch.float64).abs() + (a64.abs() * m64[:, None]).T @ a64.abs()
    extra = _weight_rounding(dtype, mask_kind)
    bound = extra + gamma(num_tokens + 2) * (1 + extra)
    assert_within(z, expected, bound * magnitude, f"Z ({dtype}, {shape}, {mask_kind})")


def _assert_lower_tiles_untouched(z, start, block):
    d_in = z.shape[0]
    strictly_lower_tiles = torch.zeros(d_in, d_in, dtype=torch.bool)
    for i in range(0, d_in, block):
        strictly_lower_tiles[i + block :, i : i + block] = True
    assert torch.equal(z.cpu()[strictly_lower_tiles], start.cpu()[strictly_lower_tiles]), (
        f"a strictly-lower tile (block {block}) was written before finalize"
    )


def test_input_factor_fractional_weights_and_strided_inputs(kernels):
    """Non-binary token weights, a non-contiguous input view, two accumulations."""
    num_tokens, d_in = 90, 41
    wide = random_inputs(num_tokens, 2 * d_in, torch.float32, 7)
    a = wide[:, ::2]  # stride (82, 2)
    assert not a.is_contiguous()
    weights = torch.rand(num_tokens, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    z = torch.zeros(d_in, d_in, device=DEVICE)
    kernels.accumulate_input_factor(z, a, weights)
    kernels.accumulate_input_factor(z, a[:50], weights[:50])
    kernels.finalize_input_factor(z)
    a64, w64 = a.to(torch.float64), weights.to(torch.float64)
    expected = torch.zeros(d_in, d_in, dtype=torch.float64, device=DEVICE)
    kfac_stats.accumulate_input_factor(expected, a64, w64)
    kfac_stats.accumulate_input_factor(expected, a64[:50], w64[:50])
    magnitude = 2 * (a64.abs() * w64[:, None]).T @ a64.abs()
    # Weighted tokens: the weight is applied to one operand before the product (fp32 here,
    # one more rounding per term), hence γ_{T+3}.
    assert_within(z, expected, gamma(num_tokens + 3) * magnitude, "Z with fractional weights")


# ---------------------------------------------------------------------------------------
# Triton: y += Σ m g², G += gᵀ a
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", STATISTICS_INPUT_DTYPES, ids=str)
@pytest.mark.parametrize("shape", RAGGED_SHAPES, ids=str)
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
def test_output_statistics_match_float64(kernels, dtype, shape, mask_kind):
    num_tokens, d_in, d_out = shape
    seed = _seed(dtype, shape, mask_kind, "out")
    a = random_inputs(num_tokens, d_in, dtype, seed)
    g = random_inputs(num_tokens, d_out, dtype, seed + 5, scale=1e-3)  # gradients are small
    m = token_mask(num_tokens, mask_kind, seed)
    y_start = random_inputs(1, d_out, torch.float32, seed + 6).reshape(-1).abs() * 1e-6
    g_start = random_inputs(d_out, d_in, torch.float32, seed + 7) * 1e-3

    y, grad = y_start.clone(), g_start.clone()
    kernels.accumulate_output_statistics(y, grad, g, a, m)
    if mask_kind == "all_zero":
        assert torch.equal(y, y_start), "an all-zero mask must leave y exactly as it was"

    a64, g64 = a.to(torch.float64), g.to(torch.float64)
    m64 = _weights64(m, num_tokens, a.device)
    y_expected, grad_expected = y_start.to(torch.float64).clone(), g_start.to(torch.float64).clone()
    kfac_stats.accumulate_output_statistics(y_expected, grad_expected, g64, a64, m64)
    # The gradient sum is NOT masked (exact weight gradient); y is. y's weights multiply
    # the fp32 square (one rounding, already within γ_{T+2}).
    y_magnitude = y_start.to(torch.float64) + ((g64 * g64) * m64[:, None]).sum(0)
    grad_magnitude = g_start.to(torch.float64).abs() + g64.abs().T @ a64.abs()
    bound = gamma(num_tokens + 2)
    assert_within(y, y_expected, bound * y_magnitude, f"y ({dtype}, {shape}, {mask_kind})")
    assert_within(grad, grad_expected, bound * grad_magnitude, f"G ({dtype}, {shape}, {mask_kind})")


def test_gradient_sum_includes_masked_tokens(kernels):
    """Masked tokens leave y alone but still count in G (the exact weight gradient)."""
    num_tokens, d_in, d_out = 40, 20, 18
    a = random_inputs(num_tokens, d_in, torch.float32, 11)
    g = random_inputs(num_tokens, d_out, torch.float32, 12)
    m = torch.zeros(num_tokens, device=DEVICE)
    y = torch.zeros(d_out, device=DEVICE)
    grad = torch.zeros(d_out, d_in, device=DEVICE)
    kernels.accumulate_output_statistics(y, grad, g, a, m)
    assert torch.count_nonzero(y) == 0
    a64, g64 = a.double(), g.double()
    assert_within(grad, g64.T @ a64, gamma(num_tokens + 1) * (g64.abs().T @ a64.abs()), "G of masked tokens")


def test_mixed_input_dtypes_meet_in_the_wider_one(kernels):
    """bf16 activations with fp32 gradients: both are read as fp32 (bf16 → fp32 is exact)."""
    num_tokens, d_in, d_out = 33, 17, 21
    a = random_inputs(num_tokens, d_in, torch.bfloat16, 21)
    g = random_inputs(num_tokens, d_out, torch.float32, 22)
    y = torch.zeros(d_out, device=DEVICE)
    grad = torch.zeros(d_out, d_in, device=DEVICE)
    kernels.accumulate_output_statistics(y, grad, g, a, None)
    a64, g64 = a.double(), g.double()
    bound = gamma(num_tokens + 2)
    assert_within(grad, g64.T @ a64, bound * (g64.abs().T @ a64.abs()), "G mixed")
    assert_within(y, (g64 * g64).sum(0), bound * (g64 * g64).sum(0), "y mixed")


@pytest.mark.parametrize(
    "config", triton_launch.STATISTICS_TILES, ids=lambda c: "D{}-T{}-w{}-s{}".format(*c)
)
def test_every_gpu_tile_configuration(kernels, monkeypatch, config):
    """Each autotune configuration of the GPU table, run alone, gives the reference's sums:
    the other tests use the interpreter's 32 x 32 tiles on CPU and the pinned configuration
    on a GPU. (The interpreter ignores warps, stages and the dot precision; it checks the
    tiling and masking logic of every block size, so one input dtype suffices. On a GPU
    each configuration compiles once here.)"""
    import triton

    dtype = torch.bfloat16
    block_d, block_t, warps, stages = config
    only = [triton.Config({"BLOCK_D": block_d, "BLOCK_T": block_t}, num_warps=warps, num_stages=stages)]
    monkeypatch.setattr(kernels._input_factor_kernel, "configs", only)
    monkeypatch.setattr(kernels._output_statistics_kernel, "configs", only)
    num_tokens, d_in, d_out = 203, 141, 133  # 2 x 2 tiles of 128, several token blocks
    seed = _seed(dtype, config)
    a = random_inputs(num_tokens, d_in, dtype, seed)
    g = random_inputs(num_tokens, d_out, dtype, seed + 1, scale=1e-3)
    m = token_mask(num_tokens, "masked_block", seed)
    start = _symmetric_start(d_in, seed + 2)
    z, y, grad = start.clone(), torch.zeros(d_out, device=DEVICE), torch.zeros(d_out, d_in, device=DEVICE)
    kernels.accumulate_input_factor(z, a, m)
    _assert_lower_tiles_untouched(z, start, block_d)
    kernels.finalize_input_factor(z)
    kernels.accumulate_output_statistics(y, grad, g, a, m)

    a64, g64, m64 = a.double(), g.double(), m.double()
    z_expected, y_expected = start.double().clone(), torch.zeros(d_out, dtype=torch.float64)
    grad_expected = torch.zeros(d_out, d_in, dtype=torch.float64)
    kfac_stats.accumulate_input_factor(z_expected, a64, m64)
    kfac_stats.accumulate_output_statistics(y_expected, grad_expected, g64, a64, m64)
    bound = gamma(num_tokens + 2)
    z_magnitude = start.double().abs() + (a64.abs() * m64[:, None]).T @ a64.abs()
    assert_within(z, z_expected, bound * z_magnitude, f"Z with tiles {config}")
    assert_within(y, y_expected, bound * (g64 * g64 * m64[:, None]).sum(0), f"y with tiles {config}")
    assert_within(grad, grad_expected, bound * (g64.abs().T @ a64.abs()), f"G with tiles {config}")


def test_kernels_reject_what_they_do_not_support(kernels, monkeypatch):
    a = torch.zeros(4, 3, dtype=torch.float64, device=DEVICE)
    z = torch.zeros(3, 3, device=DEVICE)
    with pytest.raises(TypeError, match="bf16/fp16/fp32"):
        kernels.accumulate_input_factor(z, a, None)
    with pytest.raises(TypeError, match="float32"):
        kernels.accumulate_input_factor(torch.zeros(3, 3, dtype=torch.float64, device=DEVICE), a.float(), None)
    with pytest.raises(ValueError, match="token_weights"):
        kernels.accumulate_input_factor(z, a.float(), torch.ones(5, device=DEVICE))
    with pytest.raises(ValueError, match="tokens, features"):
        kernels.accumulate_input_factor(z, a.float().reshape(2, 2, 3), None)
    with pytest.raises(ValueError, match=r"expected \(3, 3\)"):
        kernels.accumulate_input_factor(torch.zeros(4, 4, device=DEVICE), a.float(), None)
    g = torch.zeros(4, 5, device=DEVICE)
    y = torch.zeros(5, device=DEVICE)
    with pytest.raises(ValueError, match=r"expected \(5, 3\) and \(5,\)"):
        kernels.accumulate_output_statistics(y, torch.zeros(3, 5, device=DEVICE), g, a.float(), None)
    with pytest.raises(ValueError, match="input rows"):
        kernels.accumulate_output_statistics(y, torch.zeros(5, 3, device=DEVICE), g[:3], a.float(), None)
    if INTERPRETING:  # CPU tensors are refused when the kernels are compiled for a GPU
        monkeypatch.setattr(triton_launch, "INTERPRETING", False)
        with pytest.raises(RuntimeError, match="needs CUDA tensors"):
            kernels.accumulate_input_factor(z, a.float(), None)


# ---------------------------------------------------------------------------------------
# Reference, CPU path: Z on its lower triangle by column panels, then the mirror
# ---------------------------------------------------------------------------------------
def _cpu_weights(num_tokens: int, kind: str, generator: torch.Generator):
    if kind == "none":
        return None
    if kind == "all_zero":
        return torch.zeros(num_tokens)
    if kind == "holes":
        return (torch.rand(num_tokens, generator=generator) > 0.35).to(torch.float32)
    return torch.rand(num_tokens, generator=generator) * 2  # fractional weights


# d_in below, at, and across panel boundaries (PANEL_WIDTH = 128), none a multiple of it but one
PANEL_SHAPES = [(77, 45), (130, 128), (200, 129), (64, 300), (3, 257)]
# (accumulator dtype, input dtype, shape): 16-bit inputs are upcast to the fp32 accumulator
# (exactly), the same code path from there on: one shape across a panel boundary suffices.
PANEL_CASES = [(dtype, dtype, shape) for dtype in (torch.float32, torch.float64) for shape in PANEL_SHAPES] + [
    (torch.float64, torch.float64, (20, 400)),  # across the float64 panel boundary (PANEL_WIDTH_FLOAT64 = 384)
    (torch.float32, torch.bfloat16, (200, 129)),
    (torch.float32, torch.float16, (200, 129)),
]


@pytest.mark.parametrize("kind", ["none", "holes", "fractional", "all_zero"])
@pytest.mark.parametrize("dtype, input_dtype, shape", PANEL_CASES, ids=lambda v: str(v))
def test_lower_panels_then_mirror_match_float64(dtype, input_dtype, shape, kind):
    num_tokens, d_in = shape
    generator = torch.Generator().manual_seed(num_tokens * 1000 + d_in)
    a = torch.randn(num_tokens, d_in, generator=generator, dtype=torch.float64).to(input_dtype).to(torch.float64)
    weights = _cpu_weights(num_tokens, kind, generator)
    start = torch.randn(d_in, d_in, generator=generator, dtype=torch.float64)
    start = start @ start.T
    start = ((start + start.T) / 2).to(dtype).to(torch.float64)  # exactly symmetric, as after earlier batches

    z = start.to(dtype).clone()
    kfac_stats.accumulate_input_factor_lower(z, a.to(input_dtype), weights)
    kfac_stats.accumulate_input_factor_lower(z, a.to(input_dtype), weights)  # two batches
    # blocks above the diagonal panels are not touched before the mirror
    width = kfac_stats.PANEL_WIDTH_FLOAT64 if dtype == torch.float64 else kfac_stats.PANEL_WIDTH
    for begin in range(0, d_in, width):
        end = min(begin + width, d_in)
        assert torch.equal(z[begin:end, end:], start.to(dtype)[begin:end, end:])
    kfac_stats.mirror_lower_triangle(z)
    assert torch.equal(z, z.T), "the mirror must leave Z exactly symmetric"
    if kind == "all_zero":
        assert torch.equal(z.to(torch.float64), start), "an all-zero mask must leave Z exactly as it was"

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


@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kind", ["none", "holes", "fractional", "all_zero"])
def test_reference_output_statistics_match_float64(input_dtype, kind):
    """The reference's y and G (the CPU path's) in fp32 against the float64 formula
    ``y = Σ_t m_t g_t²``, ``G = Σ_t g_t a_tᵀ`` (G unmasked), written out here."""
    num_tokens, d_in, d_out = 150, 37, 29
    generator = torch.Generator().manual_seed(num_tokens + d_in)
    a = torch.randn(num_tokens, d_in, generator=generator, dtype=torch.float64).to(input_dtype)
    g = (torch.randn(num_tokens, d_out, generator=generator, dtype=torch.float64) * 1e-3).to(input_dtype)
    weights = _cpu_weights(num_tokens, kind, generator)
    y, grad = torch.zeros(d_out), torch.zeros(d_out, d_in)
    kfac_stats.accumulate_output_statistics(y, grad, g, a, weights)
    if kind == "all_zero":
        assert torch.count_nonzero(y) == 0
    a64, g64 = a.double(), g.double()
    m = torch.ones(num_tokens, dtype=torch.float64) if weights is None else weights.double()
    y_terms = torch.einsum("t,to->to", m, g64 * g64)
    grad_terms_abs = torch.einsum("to,ti->oi", g64.abs(), a64.abs())
    bound = gamma(num_tokens + 3)  # square, weight and T additions, each rounding in fp32
    assert_within(y, y_terms.sum(0), bound * y_terms.abs().sum(0), f"reference y ({input_dtype}, {kind})")
    assert_within(grad, torch.einsum("to,ti->oi", g64, a64), bound * grad_terms_abs, f"reference G ({input_dtype})")


# ---------------------------------------------------------------------------------------
# GPU: compiled, autotuned kernels at sizes with many tiles and token blocks
# ---------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", STATISTICS_INPUT_DTYPES, ids=str)
@pytest.mark.parametrize("mask_kind", ["masked_block", "fractional"])
def test_cuda_statistics_large_ragged(kernels, dtype, mask_kind):
    num_tokens, d_in, d_out = 5003, 1000, 777
    a = random_inputs(num_tokens, d_in, dtype, 1, device="cuda")
    g = random_inputs(num_tokens, d_out, dtype, 2, scale=1e-3, device="cuda")
    m = token_mask(num_tokens, mask_kind, 3, device="cuda")
    m[1000:1300] = 0
    z = torch.zeros(d_in, d_in, device="cuda")
    y = torch.zeros(d_out, device="cuda")
    grad = torch.zeros(d_out, d_in, device="cuda")
    kernels.accumulate_input_factor(z, a, m)
    kernels.accumulate_output_statistics(y, grad, g, a, m)
    kernels.finalize_input_factor(z)
    a64, g64, m64 = a.double(), g.double(), m.double()
    extra = _weight_rounding(dtype, mask_kind)
    bound = gamma(num_tokens + 2)
    assert torch.equal(z, z.T)
    z_bound = (extra + bound * (1 + extra)) * ((a64.abs() * m64[:, None]).T @ a64.abs())
    assert_within(z, (a64 * m64[:, None]).T @ a64, z_bound, "Z cuda")
    assert_within(y, (g64 * g64 * m64[:, None]).sum(0), bound * (g64 * g64 * m64[:, None]).sum(0), "y cuda")
    assert_within(grad, g64.T @ a64, bound * (g64.abs().T @ a64.abs()), "G cuda")


# ---------------------------------------------------------------------------------------
# Split over tokens: partial sums reduced in split order
# ---------------------------------------------------------------------------------------
SPLIT_CASES = [
    ((130, 70, 19), 2),  # splits of 65 tokens: not a multiple of the 32-token block
    ((203, 45, 37), 3),
    ((77, 33, 40), 7),  # more splits than token blocks; 11 tokens each
    ((5, 3, 7), 9),  # more splits requested than tokens: one token per split
]


@pytest.mark.parametrize(
    "dtype, mask_kind", [(torch.bfloat16, "holes"), (torch.float32, "fractional"), (torch.bfloat16, "none")], ids=str
)
@pytest.mark.parametrize("shape, num_splits", SPLIT_CASES, ids=str)
def test_split_tokens_match_float64_and_repeat_bitwise(kernels, dtype, shape, num_splits, mask_kind):
    """Z, y and G with the tokens split: the float64 sums within γ_{T+2} (any summation
    order obeys it), strictly-lower tiles untouched, and the same bits on a second run."""
    num_tokens, d_in, d_out = shape
    seed = _seed(dtype, shape, num_splits, mask_kind, "split")
    a = random_inputs(num_tokens, d_in, dtype, seed)
    g = random_inputs(num_tokens, d_out, dtype, seed + 1, scale=1e-3)
    m = token_mask(num_tokens, mask_kind, seed)
    start = _symmetric_start(d_in, seed + 2)
    y_start = random_inputs(1, d_out, torch.float32, seed + 3).reshape(-1).abs() * 1e-6
    g_start = random_inputs(d_out, d_in, torch.float32, seed + 4) * 1e-3

    runs = []
    for _ in range(2):
        z, y, grad = start.clone(), y_start.clone(), g_start.clone()
        kernels.accumulate_input_factor(z, a, m, num_splits=num_splits)
        if d_in > triton_launch.INTERPRETER_BLOCK:
            _assert_lower_tiles_untouched(z, start, triton_launch.INTERPRETER_BLOCK)
        kernels.finalize_input_factor(z)
        kernels.accumulate_output_statistics(y, grad, g, a, m, num_splits=num_splits)
        runs.append((z, y, grad))
    for first, second, name in zip(runs[0], runs[1], "Zyg"):
        assert torch.equal(first, second), f"{name}: two runs with {num_splits} splits differ"
    z, y, grad = runs[0]

    a64, g64 = a.double(), g.double()
    m64 = _weights64(m, num_tokens, a.device)
    z_expected, y_expected, g_expected = start.double().clone(), y_start.double().clone(), g_start.double().clone()
    kfac_stats.accumulate_input_factor(z_expected, a64, m64)
    kfac_stats.accumulate_output_statistics(y_expected, g_expected, g64, a64, m64)
    extra = _weight_rounding(dtype, mask_kind)
    bound = gamma(num_tokens + 2)
    z_magnitude = start.double().abs() + (a64.abs() * m64[:, None]).T @ a64.abs()
    assert_within(z, z_expected, (extra + bound * (1 + extra)) * z_magnitude, f"Z split {num_splits}")
    y_magnitude = y_start.double() + (g64 * g64 * m64[:, None]).sum(0)
    assert_within(y, y_expected, bound * y_magnitude, f"y split {num_splits}")
    g_magnitude = g_start.double().abs() + g64.abs().T @ a64.abs()
    assert_within(grad, g_expected, bound * g_magnitude, f"G split {num_splits}")


def test_token_splits_policy():
    """Splits depend on the shapes only: few output tiles and many tokens split; many tiles,
    few tokens or a huge partial buffer do not."""
    splits = triton_launch.token_splits
    # d = 576: 5 x 5 tiles of 128, 15 upper ones; 262144 tokens
    small = splits(262144, 15, 576 * 576)
    assert small.count == 18 and small.tokens_per_split % triton_launch.TOKEN_ALIGN == 0
    assert small.count * small.tokens_per_split >= 262144 > (small.count - 1) * small.tokens_per_split
    assert splits(262144, 86 * 87 // 2, 11008**2).count == 1  # d = 11008: 3741 tiles
    assert splits(1500, 15, 576 * 576).count == 1  # under 2 x MIN_TOKENS_PER_SPLIT
    assert splits(10**7, 1, 2**27).count == 1  # one split of G would already take 512 MiB
    assert splits(10**7, 1, 10).count == triton_launch.MAX_SPLITS
    assert splits(100, 15, 10, requested=3) == triton_launch.TokenSplits(3, 34, 128)
    assert small.bucket == 16384 and splits(10**9, 1, 10).bucket == 65536
    with pytest.raises(ValueError, match="num_splits"):
        splits(100, 15, 10, requested=0)
    with pytest.raises(ValueError, match="fp32_precision"):
        triton_launch.dot_precision(torch.float32, "fast")
    assert triton_launch.dot_precision(torch.float32) == "ieee"
    assert triton_launch.dot_precision(torch.bfloat16, "ieee") == "tf32"


def test_fp32_precision_is_checked_and_default_is_ieee(kernels):
    a = random_inputs(10, 4, torch.float32, 1)
    with pytest.raises(ValueError, match="fp32_precision"):
        kernels.accumulate_input_factor(torch.zeros(4, 4, device=DEVICE), a, None, fp32_precision="tf16")
    with pytest.raises(ValueError, match="num_splits"):
        kernels.accumulate_input_factor(torch.zeros(4, 4, device=DEVICE), a, None, num_splits=0)


# ---------------------------------------------------------------------------------------
# Element offsets past 2³¹ (64-bit address arithmetic), under the interpreter
# ---------------------------------------------------------------------------------------
_WIDE_OFFSETS_PROBE = """
import torch, kernel_checks as kc
from lora_da.kernels import kfac_stats, kfac_stats_triton as kernels
try:
    storage = kc.wide_storage(3, 64, torch.bfloat16)
except RuntimeError as error:
    print(error); raise SystemExit(3)
a = kc.wide_rows(storage, 3, 40, 0, seed=1)       # token t at element t * (2**30 + 64)
g = kc.wide_rows(storage, 3, 24, 40, seed=2)      # interleaved with a, same storage
assert storage.numel() > 2**31 and a.stride(0) * 2 > 2**31
m = torch.tensor([1.0, 0.0, 1.0])
for splits in (1, 2):
    z, y, grad = torch.zeros(40, 40), torch.zeros(24), torch.zeros(24, 40)
    kernels.accumulate_input_factor(z, a, m, num_splits=splits)
    kernels.finalize_input_factor(z)
    kernels.accumulate_output_statistics(y, grad, g, a, m, num_splits=splits)
    a64, g64 = a.double(), g.double()
    z_expected, y_expected, g_expected = torch.zeros(40, 40, dtype=torch.float64), torch.zeros(24, dtype=torch.float64), torch.zeros(24, 40, dtype=torch.float64)
    kfac_stats.accumulate_input_factor(z_expected, a64, m.double())
    kfac_stats.accumulate_output_statistics(y_expected, g_expected, g64, a64, m.double())
    # 3 tokens: bf16 products exact in fp32, <= 4 roundings
    for got, expected, magnitude, name in (
        (z, z_expected, a64.abs().T @ a64.abs(), "Z"), (y, y_expected, (g64 * g64).sum(0), "y"),
        (grad, g_expected, g64.abs().T @ a64.abs(), "G"),
    ):
        kc.assert_within(got, expected, kc.gamma(4) * magnitude, f"{name} with offsets past 2^31 ({splits} splits)")
print("ok")
"""


def test_offsets_past_int32_range(kernels):
    """Tokens 2³⁰ + 64 elements apart: token 2's offset is past 2³¹. int32 offsets wrap to
    an address before the storage (a crash in the child) or to other data (a wrong sum)."""
    assert "ok" in run_isolated(_WIDE_OFFSETS_PROBE)


@pytest.mark.cuda
def test_cuda_split_tokens_deterministic(kernels):
    """d = 576 and 20000 tokens: the default policy splits (15 upper tiles of 128); the
    result is within the float64 bound and bitwise the same on a second run."""
    num_tokens, d_in, d_out = 20000, 576, 576
    splits = triton_launch.token_splits(num_tokens, 15, d_in * d_in)
    assert splits.count > 1
    a = random_inputs(num_tokens, d_in, torch.bfloat16, 4, device="cuda")
    g = random_inputs(num_tokens, d_out, torch.bfloat16, 5, scale=1e-3, device="cuda")
    m = token_mask(num_tokens, "holes", 6, device="cuda")
    runs = []
    for _ in range(2):
        z, y, grad = torch.zeros(d_in, d_in, device="cuda"), torch.zeros(d_out, device="cuda"), torch.zeros(d_out, d_in, device="cuda")
        kernels.accumulate_input_factor(z, a, m)
        kernels.finalize_input_factor(z)
        kernels.accumulate_output_statistics(y, grad, g, a, m)
        runs.append((z, y, grad))
    assert all(torch.equal(first, second) for first, second in zip(*runs))
    z, y, grad = runs[0]
    a64, g64, m64 = a.double(), g.double(), m.double()
    bound = gamma(num_tokens + 2)
    assert_within(z, (a64 * m64[:, None]).T @ a64, bound * ((a64.abs() * m64[:, None]).T @ a64.abs()), "Z split cuda")
    assert_within(y, (g64 * g64 * m64[:, None]).sum(0), bound * (g64 * g64 * m64[:, None]).sum(0), "y split cuda")
    assert_within(grad, g64.T @ a64, bound * (g64.abs().T @ a64.abs()), "G split cuda")


@pytest.mark.cuda
def test_cuda_fp32_precision_tf32x3_bound(kernels):
    """``fp32_precision="tf32x3"``: each product from three TF32 products (hi·hi + hi·lo +
    lo·hi, each exact in fp32), missing lo·lo and the residues: ≤ 3.1·2⁻²² relative per
    product, plus three fp32 additions per product: (2⁻²⁰ + γ_{3T+2}) x Σ|a||a|. The
    default ``"ieee"`` meets the tighter γ_{T+2}."""
    num_tokens, d_in = 3000, 300
    a = random_inputs(num_tokens, d_in, torch.float32, 7, device="cuda")
    a64 = a.double()
    magnitude = a64.abs().T @ a64.abs()
    for precision, bound in (("ieee", gamma(num_tokens + 2)), ("tf32x3", 2.0**-20 + gamma(3 * num_tokens + 2))):
        z = torch.zeros(d_in, d_in, device="cuda")
        kernels.accumulate_input_factor(z, a, None, fp32_precision=precision)
        kernels.finalize_input_factor(z)
        assert_within(z, a64.T @ a64, bound * magnitude, f"Z fp32 {precision}")
