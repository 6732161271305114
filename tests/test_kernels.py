"""Triton kernels vs their plain-PyTorch / float64 references.

On a machine without CUDA these run under the Triton interpreter
(``TRITON_INTERPRET=1``, set in ``conftest.py``), with small ragged shapes: the
interpreter executes every program in Python. ``@pytest.mark.cuda`` tests run the
compiled, autotuned kernels at larger shapes.

Tolerances. Every statistics check compares against a float64 computation on the
*same* (already rounded) bf16/fp16/fp32 inputs, so the only error left is the
kernels' fp32 arithmetic. Whatever the summation order (tiles, tensor-core
fragments), a sum of ``n`` terms accumulated in fp32 is off by at most
``γ_n · Σ|terms|`` with ``γ_n = n·u/(1 − n·u)``, ``u = 2⁻²⁴`` (Higham, Thm 3.1):

* bf16/fp16 inputs: each product of two inputs is exact in fp32 (8+8 or 11+11
  significant bits ≤ 24), so only the ``T`` additions round: ``γ_T``;
* fp32 inputs: IEEE fp32 products (no TF32) add one rounding each: ``γ_{T+1}``;
* y squares the fp32-converted gradient: one more rounding for every dtype;
* in-place accumulation onto a non-zero sum adds one rounding more.

The tests use ``γ_{T+2}`` elementwise against ``Σ_t m_t |a_ti| |a_tj|`` (and the
like for y and G): a bound, not a fitted tolerance, and still ~1e-5 relative, so
one dropped or doubled token, a wrong mask or a wrong tile fails it.

Ω is compared with the reference ``kernels.omega.guidance_matrices`` computed in
float64: fp64 kernel within ``γ_{d_out+2}`` of the float64 bound (the reference
itself rounds too, hence a factor 2); fp32 kernel within the fp32 ``γ``.
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch

triton = pytest.importorskip("triton", reason="the Triton kernels need the 'triton' package")

from lora_da.kernels import dispatch, kfac_stats, omega, omega_triton  # noqa: E402
from lora_da.kernels import kfac_stats_triton  # noqa: E402

INTERPRETING = kfac_stats_triton.INTERPRETING
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float64: 2.0**-53}


def _interpreter_works() -> bool:
    # Triton < 3.7's interpreter calls int() on 1-element arrays, which numpy >= 2.4 refuses.
    import numpy

    def version(text):
        return tuple(int(part) for part in text.split(".")[:2] if part.isdigit())

    return version(triton.__version__) >= (3, 7) or version(numpy.__version__) < (2, 4)


if INTERPRETING and not _interpreter_works():  # pragma: no cover - environment check
    pytest.skip(
        f"the Triton {triton.__version__} interpreter does not run with numpy >= 2.4; install triton>=3.7",
        allow_module_level=True,
    )

DEVICE = "cpu" if INTERPRETING else "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def gamma(n: int, dtype=torch.float32) -> float:
    u = UNIT_ROUNDOFF[dtype]
    return n * u / (1 - n * u)


def random_inputs(num_tokens, dim, dtype, seed, scale=1.0, device=DEVICE):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, dim, generator=generator, dtype=torch.float64) * scale
    return x.to(dtype).to(device)


def token_mask(num_tokens, kind, seed, device=DEVICE):
    """Token weights: None, 0/1 with random holes, or with a fully masked run of 40 tokens
    (covers at least one whole ``BLOCK_T`` block of the interpreter's tiles of 32)."""
    if kind == "none":
        return None
    generator = torch.Generator().manual_seed(seed + 1)
    mask = (torch.rand(num_tokens, generator=generator) > 0.35).to(torch.float32)
    if kind == "masked_block":
        mask[20:60] = 0
    return mask.to(device)


# (num_tokens, d_in, d_out): nothing a multiple of 16 except where marked; tiles are 32.
RAGGED_SHAPES = [
    (77, 45, 37),
    (130, 70, 19),  # several token blocks and 3x3 tiles
    (5, 3, 7),  # fewer tokens than one block, d < 16
    (64, 48, 33),  # T multiple of the tile, d multiple of 16 (not of 32)
]


def assert_within(actual, expected, bound, what):
    actual = actual.to(torch.float64).cpu()
    expected = expected.to(torch.float64).cpu()
    bound = bound.to(torch.float64).cpu() + 1e-30
    excess = ((actual - expected).abs() / bound).max().item()
    assert excess <= 1.0, f"{what}: error reaches {excess:.3g} x the stated bound"


# ---------------------------------------------------------------------------------------
# Z += aᵀ diag(m) a
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", RAGGED_SHAPES, ids=str)
@pytest.mark.parametrize("mask_kind", ["holes", "masked_block", "none"])
def test_input_factor_matches_float64(dtype, shape, mask_kind):
    num_tokens, d_in, _ = shape
    seed = zlib.crc32(repr((dtype, shape, mask_kind)).encode()) % 1000
    a = random_inputs(num_tokens, d_in, dtype, seed)
    m = token_mask(num_tokens, mask_kind, seed)
    # Start from a non-zero, symmetric sum, as after earlier batches.
    start = random_inputs(d_in, d_in, torch.float32, seed + 2)
    start = start @ start.T

    z = start.clone()
    kfac_stats_triton.accumulate_input_factor(z, a, m)
    # Only upper-triangle tiles are touched before the pass ends.
    block = 32 if INTERPRETING else None
    if block is not None and d_in > block:
        strictly_lower_tiles = torch.zeros(d_in, d_in, dtype=torch.bool)
        for i in range(0, d_in, block):
            strictly_lower_tiles[i + block :, i : i + block] = True
        assert torch.equal(z.cpu()[strictly_lower_tiles], start.cpu()[strictly_lower_tiles])
    kfac_stats_triton.finalize_input_factor(z)

    a64 = a.to(torch.float64)
    m64 = torch.ones(num_tokens, dtype=torch.float64, device=a.device) if m is None else m.to(torch.float64)
    expected = start.to(torch.float64).clone()
    kfac_stats.accumulate_input_factor(expected, a64, m64)
    magnitude = start.to(torch.float64).abs() + (a64.abs() * m64[:, None]).T @ a64.abs()
    assert torch.equal(z, z.T), "finalize must leave Z exactly symmetric"
    assert_within(z, expected, gamma(num_tokens + 2) * magnitude, f"Z ({dtype}, {shape}, {mask_kind})")


def test_input_factor_fractional_weights_and_strided_inputs():
    """Non-binary token weights, a non-contiguous input view, two accumulations."""
    num_tokens, d_in = 90, 41
    wide = random_inputs(num_tokens, 2 * d_in, torch.float32, 7)
    a = wide[:, ::2]  # stride (82, 2)
    assert not a.is_contiguous()
    weights = torch.rand(num_tokens, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    z = torch.zeros(d_in, d_in, device=DEVICE)
    kfac_stats_triton.accumulate_input_factor(z, a, weights)
    kfac_stats_triton.accumulate_input_factor(z, a[:50], weights[:50])
    kfac_stats_triton.finalize_input_factor(z)
    a64, w64 = a.to(torch.float64), weights.to(torch.float64)
    expected = torch.zeros(d_in, d_in, dtype=torch.float64, device=DEVICE)
    kfac_stats.accumulate_input_factor(expected, a64, w64)
    kfac_stats.accumulate_input_factor(expected, a64[:50], w64[:50])
    magnitude = 2 * (a64.abs() * w64[:, None]).T @ a64.abs()
    # Weighted tokens: the weight is applied to one operand before the product (fp32 here,
    # one more rounding per term), hence γ_{T+3}.
    assert_within(z, expected, gamma(num_tokens + 3) * magnitude, "Z with fractional weights")


# ---------------------------------------------------------------------------------------
# y += Σ m g², G += gᵀ a
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", RAGGED_SHAPES, ids=str)
@pytest.mark.parametrize("mask_kind", ["holes", "masked_block", "none"])
def test_output_statistics_match_float64(dtype, shape, mask_kind):
    num_tokens, d_in, d_out = shape
    seed = zlib.crc32(repr((dtype, shape, mask_kind, "out")).encode()) % 1000
    a = random_inputs(num_tokens, d_in, dtype, seed)
    g = random_inputs(num_tokens, d_out, dtype, seed + 5, scale=1e-3)  # gradients are small
    m = token_mask(num_tokens, mask_kind, seed)
    y_start = random_inputs(1, d_out, torch.float32, seed + 6).reshape(-1).abs() * 1e-6
    g_start = random_inputs(d_out, d_in, torch.float32, seed + 7) * 1e-3

    y, grad = y_start.clone(), g_start.clone()
    kfac_stats_triton.accumulate_output_statistics(y, grad, g, a, m)

    a64, g64 = a.to(torch.float64), g.to(torch.float64)
    m64 = torch.ones(num_tokens, dtype=torch.float64, device=a.device) if m is None else m.to(torch.float64)
    y_expected, grad_expected = y_start.to(torch.float64).clone(), g_start.to(torch.float64).clone()
    kfac_stats.accumulate_output_statistics(y_expected, grad_expected, g64, a64, m64)
    # The gradient sum is NOT masked (exact weight gradient); y is.
    y_magnitude = y_start.to(torch.float64) + ((g64 * g64) * m64[:, None]).sum(0)
    grad_magnitude = g_start.to(torch.float64).abs() + g64.abs().T @ a64.abs()
    bound = gamma(num_tokens + 2)
    assert_within(y, y_expected, bound * y_magnitude, f"y ({dtype}, {shape}, {mask_kind})")
    assert_within(grad, grad_expected, bound * grad_magnitude, f"G ({dtype}, {shape}, {mask_kind})")


def test_gradient_sum_includes_masked_tokens():
    """Masked tokens leave y alone but still count in G (the exact weight gradient)."""
    num_tokens, d_in, d_out = 40, 20, 18
    a = random_inputs(num_tokens, d_in, torch.float32, 11)
    g = random_inputs(num_tokens, d_out, torch.float32, 12)
    m = torch.zeros(num_tokens, device=DEVICE)
    y = torch.zeros(d_out, device=DEVICE)
    grad = torch.zeros(d_out, d_in, device=DEVICE)
    kfac_stats_triton.accumulate_output_statistics(y, grad, g, a, m)
    assert torch.count_nonzero(y) == 0
    torch.testing.assert_close(grad, g.T @ a, rtol=1e-5, atol=1e-5)


def test_mixed_input_dtypes_meet_in_the_wider_one():
    num_tokens, d_in, d_out = 33, 17, 21
    a = random_inputs(num_tokens, d_in, torch.bfloat16, 21)
    g = random_inputs(num_tokens, d_out, torch.float32, 22)
    y = torch.zeros(d_out, device=DEVICE)
    grad = torch.zeros(d_out, d_in, device=DEVICE)
    kfac_stats_triton.accumulate_output_statistics(y, grad, g, a, None)
    expected = g.to(torch.float64).T @ a.to(torch.float64)
    assert_within(grad, expected, gamma(num_tokens + 2) * (g.abs().T @ a.abs().float()).double(), "G mixed")


def test_kernels_reject_what_they_do_not_support():
    a = torch.zeros(4, 3, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match="bf16/fp16/fp32"):
        kfac_stats_triton.accumulate_input_factor(torch.zeros(3, 3, device=DEVICE), a, None)
    with pytest.raises(TypeError, match="float32"):
        kfac_stats_triton.accumulate_input_factor(
            torch.zeros(3, 3, dtype=torch.float64, device=DEVICE), a.float(), None
        )
    with pytest.raises(ValueError, match="token_weights"):
        kfac_stats_triton.accumulate_input_factor(
            torch.zeros(3, 3, device=DEVICE), a.float(), torch.ones(5, device=DEVICE)
        )


# ---------------------------------------------------------------------------------------
# Ω = −(α/σ²) Δ Δᵀ + w · sym(Z⁻¹), batched
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("shape", [(3, 45, 37), (2, 70, 9), (1, 5, 3)], ids=str)
def test_guidance_matrices_match_reference(dtype, shape):
    batch, d_in, d_out = shape
    generator = torch.Generator().manual_seed(batch * 1000 + d_in)
    delta = torch.randn(batch, d_in, d_out, generator=generator, dtype=torch.float64)
    zinv = torch.randn(batch, d_in, d_in, generator=generator, dtype=torch.float64)  # not symmetric: tests sym()
    sigma = torch.rand(batch, generator=generator, dtype=torch.float64) * 3 + 0.5
    weight = torch.rand(batch, generator=generator, dtype=torch.float64) * 0.1
    alpha = 0.7
    got = omega_triton.guidance_matrices(
        delta.to(dtype).to(DEVICE), zinv.to(DEVICE), sigma.to(DEVICE), weight.to(DEVICE), alpha
    )
    assert got.dtype == dtype and got.shape == (batch, d_in, d_in)
    assert torch.equal(got, got.mT), "Ω must be exactly symmetric"
    # Magnitudes of the two terms; the fp32 kernel also sees Δ rounded to fp32 (1 more u).
    delta_in = delta.to(dtype).to(torch.float64)
    expected = omega.guidance_matrices(delta_in, zinv, sigma, weight, alpha)
    magnitude = (alpha / sigma**2).reshape(-1, 1, 1) * (delta_in.abs() @ delta_in.abs().mT) + weight.reshape(
        -1, 1, 1
    ) * zinv.abs().maximum(zinv.abs().mT)
    assert_within(got, expected, 2 * gamma(d_out + 4, dtype) * magnitude, f"Ω ({dtype}, {shape})")


def test_reference_guidance_matrices_match_method_module():
    """The batched reference equals lora_da.method.guidance_matrix applied per module."""
    from lora_da.method import guidance_matrix

    generator = torch.Generator().manual_seed(5)
    delta = torch.randn(2, 12, 7, generator=generator, dtype=torch.float64)
    zinv = torch.randn(2, 12, 12, generator=generator, dtype=torch.float64)
    zinv = zinv @ zinv.mT
    sigma = torch.tensor([1.5, 0.8], dtype=torch.float64)
    weight = torch.tensor([0.03, 0.2], dtype=torch.float64)
    batched = omega.guidance_matrices(delta, zinv, sigma, weight, 1.3)
    for b in range(2):
        one = guidance_matrix(delta[b] / sigma[b], zinv[b], 1.3, 1.0, float(weight[b]))
        torch.testing.assert_close(batched[b], one, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------
# Dispatch and end to end
# ---------------------------------------------------------------------------------------
def test_select_backend():
    assert dispatch.select_backend("cpu", "auto").name == "torch"
    assert dispatch.select_backend("cpu", "torch").name == "torch"
    assert dispatch.select_backend("cuda", "auto", torch.float64).name == "torch"
    assert dispatch.select_backend("cuda", "auto", torch.bfloat16).name == "triton"
    assert dispatch.select_backend("cuda", "triton", torch.float32).name == "triton"
    with pytest.raises(ValueError, match="stats_backend"):
        dispatch.select_backend("cpu", "cuda")
    with pytest.raises(TypeError, match="fp64"):
        dispatch.select_backend("cuda", "triton", torch.float64)
    from lora_da.config import LoraDAConfig

    with pytest.raises(ValueError, match="stats_backend"):
        LoraDAConfig(stats_backend="cuda")
    if INTERPRETING:
        backend = dispatch.select_backend("cpu", "triton", torch.float32)
        assert backend.finalize_input_factor is kfac_stats_triton.finalize_input_factor


def test_select_backend_refuses_cpu_triton_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="interpreter"):
        dispatch.select_backend("cpu", "triton", torch.float32)


def _tiny_llama_init(stats_backend, device="cpu", dtype=torch.float32):
    import lora_da
    from lora_da.models import batches, synthetic_samples, tiny_llama

    model = tiny_llama(dtype=dtype).to(device)
    samples = synthetic_samples(8, seed=1)
    return lora_da.initialize(
        model,
        list(batches(samples, batch_size=4)),
        rank=4,
        train_size=100,
        token_mask="labels",  # holes: prompt tokens and padding
        progress=False,
        stats_backend=stats_backend,
    )


def _assert_same_init(got, expected, rtol):
    assert got.modules.keys() == expected.modules.keys()
    for name, module in expected.modules.items():
        other = got.modules[name]
        assert math.isclose(other.sigma, module.sigma, rel_tol=rtol), name
        for factor in ("lora_A", "lora_B"):
            a, b = getattr(other, factor).cpu(), getattr(module, factor).cpu()
            scale = b.abs().max()
            assert (a - b).abs().max() <= rtol * scale, f"{name}.{factor}"


def _tiny_llama_statistics(stats_backend, device="cpu"):
    from lora_da.models import batches, synthetic_samples, tiny_llama
    from lora_da.statistics import collect_statistics
    from lora_da.targets import find_target_modules

    model = tiny_llama().to(device)
    modules = find_target_modules(model, None, 4)
    loader = list(batches(synthetic_samples(8, seed=1), batch_size=4))
    return collect_statistics(model, loader, modules, token_mask="labels", stats_backend=stats_backend)


def _assert_same_statistics(got, expected):
    # Identical activations and gradients, fp32 sums in another order: ~1e-7 relative;
    # 2e-5 of each statistic's largest entry leaves room for T ~ 100 additions.
    assert got.num_tokens == expected.num_tokens and got.num_samples == expected.num_samples
    for name in expected.modules:
        for what, a, b in (
            ("Z", got.input_factor(name), expected.input_factor(name)),
            ("y", got.output_factor_diag(name), expected.output_factor_diag(name)),
            ("G", got.gradient(name), expected.gradient(name)),
        ):
            assert (a - b).abs().max() <= 2e-5 * b.abs().max(), f"{name}: {what}"
    for group in got.groups:
        assert torch.equal(group.input_factor_sum, group.input_factor_sum.T), "Z not finalized"


@pytest.mark.skipif(not INTERPRETING, reason="CPU interpreter run; the CUDA variant is below")
def test_triton_statistics_match_torch_on_tiny_llama():
    reference = _tiny_llama_statistics("torch")
    got = _tiny_llama_statistics("triton")
    assert (reference.backend, got.backend) == ("torch", "triton")
    _assert_same_statistics(got, reference)


@pytest.mark.skipif(not INTERPRETING, reason="CPU interpreter run; the CUDA variant is below")
def test_initialize_triton_matches_torch_on_tiny_llama():
    reference = _tiny_llama_init("torch")
    got = _tiny_llama_init("triton")
    assert reference.backends["statistics"] == "torch"
    assert got.backends["statistics"] == "triton"
    # The statistics agree to ~1e-6 (test above); the factors go through Z⁻¹ and an
    # eigensolve, which amplify that by Z's condition number (o_proj inputs of the random
    # tiny model: ~1e3) and the eigen-gaps. 1e-2 relative is far below a real difference
    # (a wrong statistic changes the factors at O(1)).
    _assert_same_init(got, reference, rtol=1e-2)


# ---------------------------------------------------------------------------------------
# GPU: compiled, autotuned kernels at sizes with many tiles and token blocks
# ---------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_statistics_large_ragged(dtype):
    num_tokens, d_in, d_out = 5003, 1000, 777
    a = random_inputs(num_tokens, d_in, dtype, 1, device="cuda")
    g = random_inputs(num_tokens, d_out, dtype, 2, scale=1e-3, device="cuda")
    m = token_mask(num_tokens, "masked_block", 3, device="cuda")
    m[1000:1300] = 0
    z = torch.zeros(d_in, d_in, device="cuda")
    y = torch.zeros(d_out, device="cuda")
    grad = torch.zeros(d_out, d_in, device="cuda")
    kfac_stats_triton.accumulate_input_factor(z, a, m)
    kfac_stats_triton.accumulate_output_statistics(y, grad, g, a, m)
    kfac_stats_triton.finalize_input_factor(z)
    a64, g64, m64 = a.double(), g.double(), m.double()
    bound = gamma(num_tokens + 2)
    assert torch.equal(z, z.T)
    assert_within(z, (a64 * m64[:, None]).T @ a64, bound * ((a64.abs() * m64[:, None]).T @ a64.abs()), "Z cuda")
    assert_within(y, (g64 * g64 * m64[:, None]).sum(0), bound * (g64 * g64 * m64[:, None]).sum(0), "y cuda")
    assert_within(grad, g64.T @ a64, bound * (g64.abs().T @ a64.abs()), "G cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_cuda_guidance_matrices(dtype):
    batch, d_in, d_out = 4, 576, 200
    generator = torch.Generator().manual_seed(0)
    delta = torch.randn(batch, d_in, d_out, generator=generator, dtype=torch.float64).to(dtype)
    zinv = torch.randn(batch, d_in, d_in, generator=generator, dtype=torch.float64)
    sigma = torch.rand(batch, generator=generator, dtype=torch.float64) + 0.5
    weight = torch.rand(batch, generator=generator, dtype=torch.float64)
    got = omega_triton.guidance_matrices(delta.cuda(), zinv.cuda(), sigma.cuda(), weight.cuda(), 1.0)
    d64 = delta.double()
    expected = omega.guidance_matrices(d64, zinv, sigma, weight, 1.0)
    magnitude = (1 / sigma**2).reshape(-1, 1, 1) * (d64.abs() @ d64.abs().mT) + weight.reshape(-1, 1, 1) * zinv.abs()
    assert torch.equal(got, got.mT)
    assert_within(got, expected, 2 * gamma(d_out + 4, dtype) * magnitude.maximum(magnitude.mT), "Ω cuda")


@pytest.mark.cuda
def test_cuda_initialize_auto_uses_triton():
    reference = _tiny_llama_init("torch", device="cuda")
    got = _tiny_llama_init("auto", device="cuda")
    assert got.backends["statistics"] == "triton"
    _assert_same_statistics(_tiny_llama_statistics("auto", device="cuda"), _tiny_llama_statistics("torch", "cuda"))
    _assert_same_init(got, reference, rtol=1e-2)
