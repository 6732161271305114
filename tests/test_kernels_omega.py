"""Batched Initialization Guidance Matrices Ω (``kernels/omega.py``, ``kernels/omega_triton.py``).

``Ω_b = −(α/σ_b²) Δ_b Δ_bᵀ + w_b · ½(Z⁻¹_b + Z⁻¹_bᵀ)``. The kernel has no caller in the
library yet (the planned GPU dense-solve path); these tests are its only check.

Oracle: the reference ``kernels.omega.guidance_matrices`` computed in float64 on the
inputs the kernel sees (Δ rounded to the kernel's dtype). Tolerance, elementwise
against ``(α/σ²)·|Δ||Δ|ᵀ + w·max(|Z⁻¹|, |Z⁻¹|ᵀ)``: the kernel's ``Δ Δᵀ`` is a sum of
``d_out`` products (``γ_{d_out}`` in its dtype, IEEE products for fp32), then the
diagonal tile's symmetrization, the ``−α/σ²`` scale (itself rounded), the
symmetrized ``Z⁻¹`` term, its weight and the final sum: ``d_out + 4`` roundings. The
fp32 kernel also reads ``Z⁻¹``, σ and w rounded to fp32, and for fp64 the float64
reference rounds as much as the kernel: hence ``2·γ_{d_out+4}`` of the kernel's dtype.
The kernel takes fp32 and fp64 Δ only (bf16/fp16 are refused, tested below).
"""

from __future__ import annotations

import pytest
import torch
from kernel_checks import DEVICE, INTERPRETING, assert_within, gamma, import_triton_module, run_isolated

from lora_da.kernels import omega, triton_launch

# (batch, d_in, d_out); interpreter tiles are 32
RAGGED_SHAPES = [
    (3, 45, 37),
    (2, 70, 9),  # 3 x 3 tiles, d_out below one reduction block
    (1, 5, 3),  # smaller than one tile
    (2, 64, 32),  # exact multiples of the tile
    (1, 33, 0),  # no Δ columns: Ω is the variance term alone
]


@pytest.fixture(scope="module")
def kernel():
    return import_triton_module("omega_triton")


def random_problem(batch, d_in, d_out, seed):
    generator = torch.Generator().manual_seed(seed)
    delta = torch.randn(batch, d_in, d_out, generator=generator, dtype=torch.float64)
    zinv = torch.randn(batch, d_in, d_in, generator=generator, dtype=torch.float64)  # not symmetric: tests sym()
    sigma = torch.rand(batch, generator=generator, dtype=torch.float64) * 3 + 0.5
    weight = torch.rand(batch, generator=generator, dtype=torch.float64) * 0.1
    return delta, zinv, sigma, weight


def check_against_reference(got, delta, zinv, sigma, weight, alpha, dtype, what):
    batch, d_in, _ = delta.shape
    assert got.dtype == dtype and got.shape == (batch, d_in, d_in), f"{what}: {got.dtype} {tuple(got.shape)}"
    assert torch.equal(got, got.mT), f"{what}: Ω must be exactly symmetric"
    delta_in = delta.to(dtype).to(torch.float64).cpu()  # the kernel sees Δ rounded to its dtype
    zinv, sigma, weight = zinv.cpu(), sigma.cpu(), weight.cpu()
    expected = omega.guidance_matrices(delta_in, zinv, sigma, weight, alpha)
    magnitude = (alpha / sigma**2).reshape(-1, 1, 1) * (delta_in.abs() @ delta_in.abs().mT) + weight.reshape(
        -1, 1, 1
    ) * zinv.abs().maximum(zinv.abs().mT)
    d_out = delta.shape[2]
    assert_within(got, expected, 2 * gamma(d_out + 4, dtype) * magnitude, what)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("shape", RAGGED_SHAPES, ids=str)
def test_guidance_matrices_match_reference(kernel, dtype, shape):
    batch, d_in, d_out = shape
    delta, zinv, sigma, weight = random_problem(batch, d_in, d_out, seed=batch * 1000 + d_in)
    alpha = 0.7
    on_device = (t.to(DEVICE) for t in (delta.to(dtype), zinv, sigma, weight))
    got = kernel.guidance_matrices(*on_device, alpha)
    check_against_reference(got, delta, zinv, sigma, weight, alpha, dtype, f"Ω ({dtype}, {shape})")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_guidance_matrices_strided_inputs(kernel, dtype):
    """Column-major Δ (a transposed view, as the solvers hold it) and a transposed Z⁻¹ view."""
    batch, d_in, d_out = 2, 41, 23
    delta_t, zinv_t, sigma, weight = random_problem(batch, d_out, d_in, seed=77)
    delta = delta_t.to(dtype).to(DEVICE).mT  # (batch, d_in, d_out), strides (d_out·d_in, 1, d_in)
    zinv = torch.randn(batch, d_in, d_in, generator=torch.Generator().manual_seed(78), dtype=torch.float64)
    zinv_view = zinv.to(DEVICE).mT
    assert not delta.is_contiguous() and not zinv_view.is_contiguous()
    got = kernel.guidance_matrices(delta, zinv_view, sigma.to(DEVICE), weight.to(DEVICE), 1.3)
    check_against_reference(got, delta.cpu().double(), zinv.mT, sigma, weight, 1.3, dtype, f"Ω strided ({dtype})")


@pytest.mark.skipif(not INTERPRETING, reason="runs the GPU block sizes under the interpreter")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_gpu_block_sizes(kernel, monkeypatch, dtype):
    """The GPU's block sizes (not the interpreter's 32 x 32) on a ragged problem with
    several tiles and reduction blocks: the CPU runs otherwise never use them."""
    gpu = triton_launch.omega_blocks(dtype, interpreting=False)
    assert gpu != triton_launch.omega_blocks(dtype, interpreting=True), "nothing new to test"
    monkeypatch.setattr(triton_launch, "omega_blocks", lambda dtype_: gpu)
    batch, d_in, d_out = 2, 2 * gpu.block_d + 7, 3 * gpu.block_k + 5
    delta, zinv, sigma, weight = random_problem(batch, d_in, d_out, seed=11)
    got = kernel.guidance_matrices(delta.to(dtype), zinv, sigma, weight, 0.9)
    check_against_reference(got, delta, zinv, sigma, weight, 0.9, dtype, f"Ω with {gpu}")


def test_empty_batch(kernel):
    got = kernel.guidance_matrices(
        torch.zeros(0, 4, 3, device=DEVICE), torch.zeros(0, 4, 4, device=DEVICE),
        torch.zeros(0, device=DEVICE), torch.zeros(0, device=DEVICE), 1.0,
    )
    assert got.shape == (0, 4, 4)


def test_kernel_rejects_what_it_does_not_support(kernel, monkeypatch):
    delta, zinv, sigma, weight = (t.to(DEVICE) for t in random_problem(2, 6, 3, seed=1))
    for dtype in (torch.bfloat16, torch.float16):
        with pytest.raises(TypeError, match="fp32 or fp64"):
            kernel.guidance_matrices(delta.to(dtype), zinv, sigma, weight, 1.0)
    with pytest.raises(ValueError, match=r"input_factor_inverse must be \(2, 6, 6\)"):
        kernel.guidance_matrices(delta, zinv[:, :5, :5], sigma, weight, 1.0)
    with pytest.raises(ValueError, match=r"delta must be \(B, d_in, d_out\)"):
        kernel.guidance_matrices(delta[0], zinv, sigma, weight, 1.0)
    with pytest.raises(ValueError, match=r"sigma and variance_weight must have shape \(2,\)"):
        kernel.guidance_matrices(delta, zinv, sigma[:1], weight, 1.0)
    if INTERPRETING:  # CPU tensors are refused when the kernel is compiled for a GPU
        monkeypatch.setattr(triton_launch, "INTERPRETING", False)
        with pytest.raises(RuntimeError, match="needs CUDA tensors"):
            kernel.guidance_matrices(delta, zinv, sigma, weight, 1.0)


def test_reference_guidance_matrices_match_method_module():
    """The batched reference equals lora_da.methods.lora_da_reference.guidance_matrix applied per module."""
    from lora_da.methods.lora_da_reference import guidance_matrix

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


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_cuda_guidance_matrices(kernel, dtype):
    batch, d_in, d_out = 4, 576, 200
    generator = torch.Generator().manual_seed(0)
    delta = torch.randn(batch, d_in, d_out, generator=generator, dtype=torch.float64).to(dtype)
    zinv = torch.randn(batch, d_in, d_in, generator=generator, dtype=torch.float64)
    sigma = torch.rand(batch, generator=generator, dtype=torch.float64) + 0.5
    weight = torch.rand(batch, generator=generator, dtype=torch.float64)
    got = kernel.guidance_matrices(delta.cuda(), zinv.cuda(), sigma.cuda(), weight.cuda(), 1.0)
    check_against_reference(got, delta.double(), zinv, sigma, weight, 1.0, dtype, "Ω cuda")


_WIDE_OFFSETS_PROBE = """
import torch, kernel_checks as kc, test_kernels_omega as t
from lora_da.kernels import omega_triton
batch, d_in, d_out = 3, 37, 21
try:
    storage = kc.wide_storage(batch, d_in * d_out, torch.float32)
except RuntimeError as error:
    print(error); raise SystemExit(3)
# module b's Δ starts at element b * (2**30 + 64): module 2 is past 2^31
rows = kc.wide_rows(storage, batch, d_in * d_out, 0, seed=5)
delta = rows.as_strided((batch, d_in, d_out), (kc.WIDE_STRIDE, d_out, 1))
_, zinv, sigma, weight = t.random_problem(batch, d_in, d_out, seed=6)
got = omega_triton.guidance_matrices(delta, zinv, sigma, weight, 0.8)
t.check_against_reference(got, delta.double(), zinv, sigma, weight, 0.8, torch.float32, "Ω with offsets past 2^31")
print("ok")
"""


def test_offsets_past_int32_range(kernel):
    """Modules 2³⁰ + 64 elements apart: module 2's Δ is past 2³¹ (int32 offsets crash the
    child or read other data)."""
    assert "ok" in run_isolated(_WIDE_OFFSETS_PROBE)
