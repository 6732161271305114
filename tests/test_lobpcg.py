"""The compiled batched LOBPCG (lora_da.solvers.lobpcg) against torch.linalg.eigh
in float64.

Accuracy bounds checked (Davis–Kahan with the solver's stopping rule
‖A x − θ x‖ ≤ tol·‖A‖_est for each of the k pairs):
  largest principal angle ≤ √k · tol · ‖A‖ / (λ_{k+1} − λ_k) · SAFETY
  |θ_j − λ_j| ≤ (tol · ‖A‖)² / gap + rounding, checked as ≤ 1e-6 · gap here;
fp64 uses tol = 1e-10 (default), fp32 tol = 2e-4 (default); SAFETY = 10 covers
the estimate ‖A‖_est ≤ ‖A‖ and the mixing inside the block.
"""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch

from lora_da.solvers import LoraDAOperator, lobpcg

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
from problems import largest_principal_angle, matrices_with_spectrum, slowly_decaying_spectrum  # noqa: E402

SAFETY = 10.0


def symmetric(batch, n, seed, spd=False):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(batch, n, n, dtype=torch.float64, generator=g)
    if spd:
        return a @ a.mT / n + 1e-3 * torch.eye(n, dtype=torch.float64)
    return 0.5 * (a + a.mT)


def check_against_eigh(matrices, result, k, largest=False, tol=1e-10, angle_floor=1e-12):
    values, vectors = torch.linalg.eigh(matrices.to(torch.float64))
    if largest:
        values, vectors = values.flip(-1), vectors.flip(-1)
    exact_values, exact_vectors = values[..., :k], vectors[..., :k]
    next_values = values[..., k] if k < values.shape[-1] else None
    norm = values.abs().amax(-1)
    assert result.eigenvectors.shape == exact_vectors.shape
    angles = largest_principal_angle(exact_vectors, result.eigenvectors)
    if next_values is not None:
        gap = (next_values - exact_values[..., -1]).abs()
        bound = SAFETY * math.sqrt(k) * tol * norm / gap + angle_floor
        assert (angles <= bound).all(), (angles, bound)
        error = (result.eigenvalues.to(torch.float64) - exact_values).abs().amax(-1)
        assert (error <= 1e-6 * gap + SAFETY * tol * norm).all(), (error, gap)
    gram = result.eigenvectors.mT.to(torch.float64) @ result.eigenvectors.to(torch.float64)
    eye = torch.eye(k, dtype=torch.float64)
    assert (gram - eye).abs().max() < (1e-10 if result.eigenvectors.dtype == torch.float64 else 1e-4)
    return angles


@pytest.mark.parametrize("n,k,batch", [(48, 1, 1), (64, 4, 3), (300, 8, 4), (250, 24, 2)])
def test_random_symmetric(n, k, batch):
    a = symmetric(batch, n, seed=n + k)
    result = lobpcg(a, k)
    assert result.converged.all() and not result.dense_fallback
    assert (result.residual_norms <= result.tol * result.norm_estimate.unsqueeze(-1)).all()
    check_against_eigh(a, result, k)


def test_random_spd_largest():
    a = symmetric(3, 250, seed=1, spd=True)
    result = lobpcg(a, 6, largest=True)
    assert result.converged.all()
    assert (result.eigenvalues[..., :-1] >= result.eigenvalues[..., 1:]).all()  # descending
    check_against_eigh(a, result, 6, largest=True)


def test_batch_32_small():
    a = symmetric(32, 48, seed=7)
    result = lobpcg(a, 3)
    assert result.eigenvalues.shape == (32, 3) and result.iterations.shape == (32,)
    check_against_eigh(a, result, 3)


def test_slowly_decaying_small_gap_where_torch_lobpcg_fails():
    n, k, batch = 512, 8, 3
    spectrum = slowly_decaying_spectrum(n).expand(batch, n).contiguous()
    a, bases = matrices_with_spectrum(spectrum, seed=3)
    result = lobpcg(a, k)
    assert result.converged.all()
    ours = largest_principal_angle(bases[..., :k], result.eigenvectors)
    assert ours.max() < 1e-7
    torch_vectors = torch.stack([torch.lobpcg(a[b], k=k, niter=10, largest=False)[1] for b in range(batch)])
    theirs = largest_principal_angle(bases[..., :k], torch_vectors)
    assert theirs.max() > 1e-2  # the case this solver exists for
    check_against_eigh(a, result, k)


def test_dense_fallback_for_small_n():
    a = symmetric(2, 20, seed=5)
    result = lobpcg(a, 8)
    assert result.dense_fallback and "dense fallback" in result.backend
    check_against_eigh(a, result, 8, tol=1e-13)
    largest = lobpcg(a, 8, largest=True)
    check_against_eigh(a, largest, 8, largest=True, tol=1e-13)


def test_batch_shape_and_determinism():
    a = symmetric(6, 90, seed=11).reshape(2, 3, 90, 90)
    first = lobpcg(a, 2, seed=5)
    second = lobpcg(a, 2, seed=5)
    assert first.eigenvectors.shape == (2, 3, 90, 2)
    assert torch.equal(first.eigenvectors, second.eigenvectors)
    assert torch.equal(first.eigenvalues, second.eigenvalues)


def test_float32_bound():
    n, k = 256, 4
    spectrum = torch.linspace(-1.0, 1.0, n, dtype=torch.float64)
    spectrum[:k] -= 0.5  # relative gap 0.25 of ‖A‖ = 1.5
    a, bases = matrices_with_spectrum(spectrum.expand(2, n).contiguous(), seed=2)
    result = lobpcg(a.float(), k)
    assert result.eigenvectors.dtype == torch.float32 and result.converged.all()
    # fp32 bound: √k · tol · ‖A‖/gap · SAFETY with tol 2e-4 ≈ 2.4e-2 rad; it reaches ~1e-4.
    angles = check_against_eigh(a, result, k, tol=result.tol)
    assert angles.max() < 1e-3


def lora_da_problem(batch, d_in, d_out, seed, rank=None):
    g = torch.Generator().manual_seed(seed)
    delta = torch.randn(batch, d_in, d_out, dtype=torch.float64, generator=g)
    if rank is not None:  # rank-deficient D
        delta = torch.randn(batch, d_in, rank, dtype=torch.float64, generator=g) @ torch.randn(
            batch, rank, d_out, dtype=torch.float64, generator=g)
    delta = delta / torch.linalg.matrix_norm(delta, ord=2).reshape(batch, 1, 1)
    x = torch.randn(batch, d_in, 3 * d_in, dtype=torch.float64, generator=g)
    z = x @ x.mT / (3 * d_in) + 1e-2 * torch.eye(d_in, dtype=torch.float64)
    return delta, torch.linalg.cholesky(z)


@pytest.mark.parametrize("d_in,d_out,rank", [(96, 40, None), (128, 300, None), (120, 64, 3)])
def test_lora_da_operator(d_in, d_out, rank):
    delta, chol = lora_da_problem(4, d_in, d_out, seed=d_in, rank=rank)
    op = LoraDAOperator(delta, chol, alpha=1.0, variance_scale=[0.03, 0.01, 0.05, 0.02])
    result = lobpcg(op, 8)
    assert result.converged.all() and not result.dense_fallback
    check_against_eigh(op.dense(), result, 8)


def test_lora_da_operator_shared_cholesky_and_float32():
    delta, chol = lora_da_problem(3, 80, 50, seed=9)
    op = LoraDAOperator(delta, chol[0], alpha=1.0, variance_scale=0.02)
    result = lobpcg(op, 4)
    check_against_eigh(op.dense(), result, 4)
    op32 = LoraDAOperator(delta.float(), chol[0].float(), alpha=1.0, variance_scale=0.02)
    result32 = lobpcg(op32, 4)
    assert result32.eigenvectors.dtype == torch.float32
    check_against_eigh(op.dense(), result32, 4, tol=result32.tol)


def test_errors():
    with pytest.raises(ValueError):
        lobpcg(torch.zeros(3, 4, dtype=torch.float64), 1)
    with pytest.raises(ValueError):
        lobpcg(torch.eye(10, dtype=torch.float64), 11)
    with pytest.raises(RuntimeError, match="non-finite|did not converge|LOBPCG"):
        bad = torch.eye(60, dtype=torch.float64)
        bad[3, 3] = float("nan")
        lobpcg(bad, 2)


@pytest.mark.slow
@pytest.mark.parametrize("n,k,batch", [(2048, 8, 2), (1024, 64, 1)])
def test_large(n, k, batch):
    spectrum = slowly_decaying_spectrum(n).expand(batch, n).contiguous()
    a, bases = matrices_with_spectrum(spectrum, seed=n, distinct_bases=1)
    result = lobpcg(a, k)
    assert result.converged.all()
    assert largest_principal_angle(bases[..., :k], result.eigenvectors).max() < 1e-6


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_matches_cpu(dtype):
    a = symmetric(4, 300, seed=3)
    result = lobpcg(a.to("cuda", dtype), 6)
    assert result.eigenvectors.is_cuda and "cuda" in result.backend
    tol = result.tol
    check_against_eigh(a, type(result)(**{**result.__dict__, "eigenvectors": result.eigenvectors.cpu(),
                                          "eigenvalues": result.eigenvalues.cpu()}), 6, tol=tol)
    delta, chol = lora_da_problem(3, 96, 40, seed=1)
    op = LoraDAOperator(delta.to("cuda", dtype), chol.to("cuda", dtype), alpha=1.0, variance_scale=0.03)
    gpu = lobpcg(op, 8)
    cpu_op = LoraDAOperator(delta, chol, alpha=1.0, variance_scale=0.03)
    check_against_eigh(cpu_op.dense(), type(gpu)(**{**gpu.__dict__, "eigenvectors": gpu.eigenvectors.cpu(),
                                                   "eigenvalues": gpu.eigenvalues.cpu()}), 8, tol=gpu.tol)
    fallback = lobpcg(a[:, :20, :20].to("cuda", dtype), 8)
    assert fallback.dense_fallback


def test_initialize_auto_matches_eigh():
    transformers = pytest.importorskip("transformers")  # noqa: F841
    import lora_da
    from lora_da.models import batches, synthetic_samples, tiny_llama

    model = tiny_llama()
    samples = synthetic_samples(16, vocab_size=model.config.vocab_size)
    results = {}
    for solver in ("eigh", "auto"):
        results[solver] = lora_da.initialize(model, list(batches(samples, 4)), rank=4, train_size=100,
                                             progress=False, solver=solver)
    assert results["auto"].backends["solve"].startswith("lobpcg/")
    assert results["eigh"].backends["solve"] != results["auto"].backends["solve"]
    for name, reference in results["eigh"].modules.items():
        ours = results["auto"].modules[name]
        assert torch.allclose(ours.eigenvalues, reference.eigenvalues, rtol=1e-7, atol=1e-9), name
        # same subspace and, after the sign fix, the same vectors
        assert torch.allclose(ours.lora_A, reference.lora_A, atol=1e-5), name
        assert torch.allclose(ours.lora_B, reference.lora_B, atol=1e-5), name



def test_widely_spread_spectra_near_the_dense_threshold():
    """Small n with a wide spectrum made an earlier version stagnate with Ritz
    values outside the spectrum; every case must now be exact (or dense)."""
    torch.manual_seed(0)
    for n, spread in ((32, 1e2), (40, 1e2), (80, 1e6)):
        for seed in range(8):
            q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
            values = torch.cat([-torch.tensor([1.0, 0.3, 0.16, 0.15, 0.12, 0.1], dtype=torch.float64),
                                torch.rand(n - 6, dtype=torch.float64) * spread])
            a = q @ torch.diag(values) @ q.T
            result = lobpcg(a.unsqueeze(0), 4, seed=seed)
            assert result.converged.all()
            torch.testing.assert_close(result.eigenvalues[0], torch.sort(values).values[:4], rtol=0, atol=1e-8)


def test_failed_eigenpairs_flags_bad_results():
    from lora_da.solvers import failed_eigenpairs

    delta, chol = lora_da_problem(3, 96, 40, seed=3)
    op = LoraDAOperator(delta, chol, alpha=1.0, variance_scale=[0.03, 0.01, 0.05])
    good = lobpcg(op, 8)
    assert not failed_eigenpairs(op, good).any()
    vectors = good.eigenvectors.clone()
    vectors[1, :, 0] += 1e-3 * vectors[1, :, 1]  # basis no longer orthonormal
    values = good.eigenvalues.clone()
    values[2, 3] -= 1e-3  # a wrong eigenvalue: large residual
    bad = type(good)(**{**good.__dict__, "eigenvectors": vectors, "eigenvalues": values})
    assert failed_eigenpairs(op, bad).tolist() == [False, True, True]
    unconverged = type(good)(**{**good.__dict__, "converged": torch.tensor([True, True, False])})
    assert failed_eigenpairs(op, unconverged).tolist() == [False, False, True]


def test_initialize_redoes_failed_solves_densely(monkeypatch):
    pytest.importorskip("transformers")
    import lora_da
    import lora_da.api as api
    from lora_da.models import batches, synthetic_samples, tiny_llama

    real = api.lobpcg

    def sabotaged(operator, k, **kwargs):
        result = real(operator, k, **kwargs)
        result.converged[0] = False
        return result

    monkeypatch.setattr(api, "lobpcg", sabotaged)
    data = list(batches(synthetic_samples(8, seed=2), 4))
    model = tiny_llama(hidden_size=128, intermediate_size=256, num_layers=1)
    with pytest.warns(RuntimeWarning, match="failed the residual/orthonormality check"):
        auto = lora_da.initialize(model, data, rank=4, train_size=100, progress=False, solver="auto")
    exact = lora_da.initialize(model, data, rank=4, train_size=100, progress=False, solver="eigh")
    assert "torch.linalg.eigh (float64) for" in auto.backends["solve"]
    for name, m in exact.modules.items():
        assert largest_principal_angle(auto.modules[name].lora_A.T.double(), m.lora_A.T.double()) < 1e-6, name


def test_preconditioner_tames_an_ill_conditioned_input_factor():
    """Z with condition number 1e8 (as on real down_proj/o_proj inputs): Ω's spectrum
    spans ~βc·1e8; P = (βcZ⁻¹ + αI)⁻¹ must keep the answer exact and cut iterations."""
    from lora_da.solvers import guidance_preconditioner

    generator = torch.Generator().manual_seed(7)
    n, d_out, batch = 256, 96, 3
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=generator))
    z = q @ torch.diag(torch.logspace(0, -8, n, dtype=torch.float64)) @ q.T
    z = z + 1e-12 * torch.eye(n, dtype=torch.float64)
    chol = torch.linalg.cholesky(z).expand(batch, n, n).contiguous()
    delta = torch.randn(batch, n, d_out, dtype=torch.float64, generator=generator)
    delta = delta / torch.linalg.matrix_norm(delta, ord=2).reshape(batch, 1, 1)
    scales = [1e-3, 3e-3, 1e-2]
    plain = LoraDAOperator(delta, chol, alpha=1.0, variance_scale=scales)
    preconditioned = LoraDAOperator(
        delta, chol, alpha=1.0, variance_scale=scales,
        preconditioner_cholesky=torch.stack([guidance_preconditioner(z, 1.0, s) for s in scales]),
        preconditioner_shift=scales,
    )
    # the factored form is the SPD matrix (βcZ⁻¹ + αI)⁻¹ it stands for (float64: 1e-8 of its norm,
    # the subtraction I − βcM⁻¹ loses ~ε·cond(M) there)
    eye = torch.eye(n, dtype=torch.float64)
    for index, s in enumerate(scales):
        exact = torch.linalg.inv(s * torch.linalg.inv(z) + eye)
        got = preconditioned.dense_preconditioner()[index]
        assert (got - exact).abs().max() <= 1e-8 * exact.abs().max()
    fast = lobpcg(preconditioned, 8)
    slow = lobpcg(plain, 8)
    assert fast.converged.all()
    check_against_eigh(plain.dense(), fast, 8)
    assert int(fast.iterations.max()) * 2 <= int(slow.iterations.max()), (fast.iterations, slow.iterations)
