"""What the CUDA backend runs, run on the CPU through the same algorithm: the
one-exchange LOBPCG (csrc/lobpcg_fused.hpp) and the dense-Ω path (csrc/solve.hpp),
against torch.linalg.eigh in float64.

Tolerances (as in test_solvers.py): with the stopping rule
‖A x − θ x‖ ≤ max(tol·max|θ_block|, 100 ε ‖A‖_est) ≤ tol·‖A‖, Davis–Kahan bounds the
largest principal angle by √k · tol · ‖A‖ / gap; SAFETY = 10 covers ‖A‖_est ≤ ‖A‖
and the mixing inside the block. tol = 1e-10 (float64), 2e-4 (float32).
Orthonormality XᵀX = I to 1e-12 (float64; the basis is orthonormalized to rounding
each iteration) and 1e-4 (float32, ~√n ε32 in the products).
The transfer counts: the one-exchange variant downloads once per iteration (plus
the start's) and uploads once per iteration (plus the random start and the start's
coefficients); the classic variant needs four downloads and five uploads.
"""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch

from lora_da._native import core
from lora_da.solvers import LoraDAOperator

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
from bench_lobpcg import guidance_problem, guidance_solve  # noqa: E402
from problems import largest_principal_angle  # noqa: E402

SAFETY = 10.0
TOL = {torch.float64: 1e-10, torch.float32: 2e-4}
ORTHONORMAL = {torch.float64: 1e-12, torch.float32: 1e-4}


def dense_solve(a: torch.Tensor, k: int, *, one_exchange, largest: bool = False, max_iter: int = 500):
    """The core's DenseRequest on (B, n, n) CPU matrices; returns (report, eigenvectors (B, n, k))."""
    a = a.contiguous()
    batch, n, _ = a.shape
    vectors = torch.empty(batch, k, n, dtype=a.dtype)
    request = core().DenseRequest(
        matrices=a.data_ptr(), matrix_stride=n * n, batch=batch, n=n, dtype=str(a.dtype).replace("torch.", ""),
        k=k, guard=None, largest=largest, tol=None, max_iter=max_iter, seed=0, eigenvectors=vectors.data_ptr(),
        device="cpu", stream=0, one_exchange=one_exchange,
    )
    return core().lobpcg_dense(request), vectors.transpose(-1, -2)


def check_against(matrices64: torch.Tensor, report: dict, vectors: torch.Tensor, k: int, dtype, largest=False):
    values, exact = torch.linalg.eigh(matrices64)
    if largest:
        values, exact = values.flip(-1), exact.flip(-1)
    batch = matrices64.shape[0]
    found = torch.tensor(report["eigenvalues"], dtype=torch.float64).reshape(batch, k)
    norm = values.abs().amax(-1)
    gap = (values[:, k] - values[:, k - 1]).abs()
    tol = TOL[dtype]
    angles = largest_principal_angle(exact[..., :k], vectors)
    bound = SAFETY * math.sqrt(k) * tol * norm / gap + 1e-12
    assert all(report["converged"]), report["iterations"]
    assert (angles <= bound).all(), (angles, bound)
    assert ((found - values[:, :k]).abs().amax(-1) <= 1e-6 * gap + SAFETY * tol * norm).all()
    gram = vectors.mT.to(torch.float64) @ vectors.to(torch.float64)
    assert (gram - torch.eye(k, dtype=torch.float64)).abs().max() < ORTHONORMAL[dtype]


def symmetric(batch, n, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(batch, n, n, dtype=torch.float64, generator=g)
    return 0.5 * (a + a.mT)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n,k,batch", [(300, 8, 4), (250, 24, 2), (161, 3, 5)])
def test_one_exchange_dense_matrices_match_eigh(dtype, n, k, batch):
    a = symmetric(batch, n, seed=n + k)
    report, vectors = dense_solve(a.to(dtype), k, one_exchange=True)
    assert report["one_exchange"] and not report["dense_fallback"]
    check_against(a, report, vectors, k, dtype)


def test_one_exchange_largest():
    a = symmetric(3, 240, seed=5)
    report, vectors = dense_solve(a, 6, one_exchange=True, largest=True)
    found = report["eigenvalues"]
    assert all(found[i] >= found[i + 1] for i in range(5))  # descending, problem 0
    check_against(a, report, vectors, 6, torch.float64, largest=True)


def test_one_exchange_downloads_once_per_iteration():
    """The CUDA path's contract: one download and one upload per iteration (a regression to the
    classic variant's 4 + 5, or any extra round trip in the loop, fails here)."""
    a = symmetric(4, 300, seed=3)
    report, _ = dense_solve(a, 8, one_exchange=True)
    iterations = max(report["iterations"])
    assert iterations > 10
    assert report["downloads"] == iterations + 2  # the start's exchange, then one per iteration 0..I
    assert report["uploads"] == iterations + 2  # the random start, the start's coefficients, iterations 0..I-1
    classic, _ = dense_solve(a, 8, one_exchange=False)
    assert not classic["one_exchange"]
    assert classic["downloads"] >= 4 * max(classic["iterations"])  # the counter sees the classic variant's trips


def test_one_exchange_is_the_cpu_default_only_when_asked():
    a = symmetric(2, 200, seed=9)
    default, _ = dense_solve(a, 4, one_exchange=None)
    assert default["one_exchange"] is False  # the CPU backend keeps the classic variant by default


def test_max_iter_stops_unconverged():
    a = symmetric(2, 400, seed=11)
    report, vectors = dense_solve(a, 8, one_exchange=True, max_iter=2)
    assert report["iterations"] == [2, 2] and not any(report["converged"])
    gram = vectors.mT @ vectors
    assert (gram - torch.eye(8, dtype=torch.float64)).abs().max() < 1e-12


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("form,one_exchange", [("dense", True), ("dense", False), ("operator", True)])
def test_guidance_variants_match_eigh(dtype, form, one_exchange):
    # "ragged": each call its own d_in (the batch of a call shares one)
    for n, batch in ((180, 3), (257, 2)):
        op = guidance_problem(batch, n, n // 3, seed=n, dtype=dtype)
        report, vectors = guidance_solve(op, 8, one_exchange=one_exchange, omega_form=form)
        assert report["omega_form"] == form and report["one_exchange"] is one_exchange
        assert report["problems_per_chunk"] == batch
        exact = LoraDAOperator(delta=op.delta.double(), cholesky=op.cholesky.double(), alpha=op.alpha,
                               variance_scale=op.variance_scale).dense()
        check_against(exact, report, vectors, 8, dtype)


def test_guidance_without_preconditioner_and_with_initial():
    op = guidance_problem(2, 200, 40, seed=2, preconditioned=False)
    start = torch.linalg.svd(op.delta, full_matrices=False)[0][..., :8]
    report, vectors = guidance_solve(op, 8, one_exchange=True, omega_form="dense", initial=start)
    check_against(op.dense(), report, vectors, 8, torch.float64)


def test_dense_chunks_solve_each_problem_as_a_whole_batch_would():
    """A batch split into chunks (dense Ω that does not fit at once) gives each problem the
    start it has in the whole batch: the same iterations and eigenvectors."""
    op = guidance_problem(5, 160, 30, seed=4)
    whole, whole_vectors = guidance_solve(op, 4, one_exchange=True, omega_form="dense")
    parts, part_vectors = guidance_solve(op, 4, one_exchange=True, omega_form="dense", dense_chunk=2)
    assert parts["problems_per_chunk"] == 2 and whole["problems_per_chunk"] == 5
    assert parts["iterations"] == whole["iterations"]
    assert (part_vectors - whole_vectors).abs().max() < 1e-12
    check_against(op.dense(), parts, part_vectors, 4, torch.float64)


def test_non_finite_operator_is_an_error():
    a = symmetric(2, 200, seed=1)
    a[1, 3, 7] = a[1, 7, 3] = float("nan")
    with pytest.raises(RuntimeError, match="non-finite"):
        dense_solve(a, 4, one_exchange=True)


def test_bad_variant_fields():
    op = guidance_problem(1, 100, 20)
    with pytest.raises(ValueError, match="GuidanceRequest.omega_form='sparse'"):
        guidance_solve(op, 2, omega_form="sparse")
    with pytest.raises(TypeError, match="one_exchange must be a bool"):
        guidance_solve(op, 2, one_exchange=1)
    with pytest.raises(ValueError, match="dense_chunk=0"):
        guidance_solve(op, 2, omega_form="dense", dense_chunk=0)


def test_one_exchange_on_a_tight_cluster():
    """20 eigenvalues within 2e-8 at the bottom, k = 8: the block splits the cluster. The
    one-exchange variant converges with orthonormal vectors whose Rayleigh quotients are the
    cluster's (|θ − λ| ≤ tol · ‖A‖ · SAFETY); the residuals are checked in float64 here."""
    g = torch.Generator().manual_seed(1)
    q = torch.linalg.qr(torch.randn(300, 300, dtype=torch.float64, generator=g))[0]
    spectrum = torch.cat([1.0 + 1e-9 * torch.arange(20, dtype=torch.float64),
                          torch.linspace(2, 3, 280, dtype=torch.float64)])
    a = (q * spectrum) @ q.mT
    a = (0.5 * (a + a.mT)).unsqueeze(0)
    report, vectors = dense_solve(a, 8, one_exchange=True)
    assert report["converged"] == [True]
    gram = vectors.mT @ vectors
    assert (gram - torch.eye(8, dtype=torch.float64)).abs().max() < 1e-12
    values = torch.tensor(report["eigenvalues"], dtype=torch.float64)
    assert (values - spectrum[:8]).abs().max() <= SAFETY * 1e-10 * 3.0
    residual = a[0] @ vectors[0] - vectors[0] * values
    assert residual.norm(dim=0).max() <= SAFETY * 1e-10 * 3.0


def to_device(op: LoraDAOperator, device: str) -> LoraDAOperator:
    return LoraDAOperator(delta=op.delta.to(device), cholesky=op.cholesky.to(device), alpha=op.alpha,
                          variance_scale=op.variance_scale,
                          preconditioner_cholesky=op.preconditioner_cholesky.to(device),
                          preconditioner_shift=op.preconditioner_shift)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("form,one_exchange", [("auto", None), ("dense", True), ("operator", True),
                                               ("operator", False)])
def test_cuda_variants_match_eigh(dtype, form, one_exchange):
    for n, batch in ((180, 3), (257, 2)):
        op = guidance_problem(batch, n, n // 3, seed=n, dtype=dtype)
        report, vectors = guidance_solve(to_device(op, "cuda"), 8, one_exchange=one_exchange, omega_form=form)
        if form == "auto":  # what CUDA runs by default
            assert report["omega_form"] == "dense" and report["one_exchange"] is True
        exact = LoraDAOperator(delta=op.delta.double(), cholesky=op.cholesky.double(), alpha=op.alpha,
                               variance_scale=op.variance_scale).dense()
        check_against(exact, report, vectors.cpu(), 8, dtype)
        if report["one_exchange"]:
            assert report["downloads"] == max(report["iterations"]) + 2


@pytest.mark.cuda
def test_cuda_repeated_solves_reuse_the_pooled_context():
    """Many solves in a row (the pooled handles and pinned buffer reused, memory stream-ordered)
    give the same answer each time and leave no device memory behind."""
    op = to_device(guidance_problem(2, 200, 40, seed=8), "cuda")
    first, vectors = guidance_solve(op, 4)
    torch.cuda.synchronize()
    before = torch.cuda.mem_get_info()[0]
    for _ in range(5):
        report, again = guidance_solve(op, 4)
        assert report["iterations"] == first["iterations"]
        assert (again - vectors).abs().max().item() == 0.0
    torch.cuda.synchronize()
    assert torch.cuda.mem_get_info()[0] >= before - (64 << 20)


def test_the_backend_string_names_the_variant():
    op = guidance_problem(2, 200, 40, seed=6)
    assert guidance_solve(op, 4)[0]["backend"] == "lobpcg/cpu-openblas"  # the CPU default: unchanged
    report, _ = guidance_solve(op, 4, one_exchange=True, omega_form="dense")
    assert report["backend"] == "lobpcg/cpu-openblas (dense Ω, one exchange)"
    report, _ = dense_solve(symmetric(1, 200, seed=2), 4, one_exchange=True)
    assert report["backend"] == "lobpcg/cpu-openblas (one exchange)"
