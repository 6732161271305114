"""The compiled batched LOBPCG (lora_da.solvers.lobpcg) against torch.linalg.eigh
in float64.

Accuracy bounds checked (Davis–Kahan with the solver's stopping rule
‖A x − θ x‖ ≤ max(tol·max|θ_block|, 100 ε ‖A‖_est) ≤ tol·‖A‖ for each of the k pairs):
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


def test_lora_da_operator_apply_matches_the_formula_for_every_factor_layout():
    """``LoraDAOperator.apply`` (the independent check's Ω V) against ``−αΔ̂Δ̂ᵀV + c Z⁻¹V`` with
    ``Z⁻¹`` from ``torch.linalg.inv(L Lᵀ)``: a row-major factor batch (two triangular solves), LAPACK's column-major one,
    every other factor of a larger stack (strided: ``cholesky_solve``) and one shared factor."""
    delta, chol = lora_da_problem(6, 40, 25, seed=21)
    v = torch.randn(6, 40, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(22))
    scales = [0.03, 0.01, 0.05, 0.02, 0.04, 0.06]
    for factors in (chol.contiguous(), chol, torch.cat([chol, chol])[::2], chol[0]):
        z_inverse = torch.linalg.inv(factors @ factors.mT)
        c = torch.tensor(scales, dtype=torch.float64).view(-1, 1, 1)
        expected = -(delta @ (delta.mT @ v)) + c * (z_inverse @ v)
        got = LoraDAOperator(delta, factors, alpha=1.0, variance_scale=scales).apply(v)
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-11)


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
    import lora_da.methods.lora_da as lora_da_method
    from lora_da.models import batches, synthetic_samples, tiny_llama

    real = lora_da_method.lobpcg

    def sabotaged(operator, k, **kwargs):
        result = real(operator, k, **kwargs)
        result.converged[0] = False
        return result

    monkeypatch.setattr(lora_da_method, "lobpcg", sabotaged)
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
    generator = torch.Generator().manual_seed(7)
    n, d_out, batch = 256, 96, 3
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=generator))
    z = q @ torch.diag(torch.logspace(0, -8, n, dtype=torch.float64)) @ q.T
    z = z + 1e-12 * torch.eye(n, dtype=torch.float64)
    chol = torch.linalg.cholesky(z).expand(batch, n, n).contiguous()
    delta = torch.randn(batch, n, d_out, dtype=torch.float64, generator=generator)
    delta = delta / torch.linalg.matrix_norm(delta, ord=2).reshape(batch, 1, 1)
    scales = [1e-3, 3e-3, 1e-2]
    alpha = 1.0
    plain = LoraDAOperator(delta, chol, alpha=alpha, variance_scale=scales)
    eye = torch.eye(n, dtype=torch.float64)
    # the factor of P, built here independently of the library: M = βcI + αZ, M = L_M L_Mᵀ
    shifted = torch.stack([s * eye + alpha * z for s in scales])
    preconditioned = LoraDAOperator(
        delta, chol, alpha=alpha, variance_scale=scales,
        preconditioner_cholesky=torch.linalg.cholesky(shifted), preconditioner_shift=scales,
    )
    # the factored form is the SPD matrix (βcZ⁻¹ + αI)⁻¹ it stands for (float64: 1e-8 of its norm,
    # the subtraction I − βcM⁻¹ loses ~ε·cond(M) there)
    for index, s in enumerate(scales):
        exact = torch.linalg.inv(s * torch.linalg.inv(z) + alpha * eye)
        got = preconditioned.dense_preconditioner()[index]
        assert (got - exact).abs().max() <= 1e-8 * exact.abs().max()
    fast = lobpcg(preconditioned, 8)
    slow = lobpcg(plain, 8)
    assert fast.converged.all()
    check_against_eigh(plain.dense(), fast, 8)
    assert int(fast.iterations.max()) * 2 <= int(slow.iterations.max()), (fast.iterations, slow.iterations)


def _unpreconditioned_problem(condition: float, dtype: torch.dtype) -> LoraDAOperator:
    """One LoRA-DA problem (d_in 300, d_out 40) whose Z has condition ``condition``, held
    in ``dtype``, without a preconditioner: the hard case for LOBPCG."""
    g = torch.Generator().manual_seed(0)
    n, d_out = 300, 40
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=g))
    z = (q * torch.logspace(0, -math.log10(condition), n, dtype=torch.float64)) @ q.T
    delta = torch.randn(n, d_out, dtype=torch.float64, generator=g)
    delta = delta / torch.linalg.matrix_norm(delta, ord=2)
    return LoraDAOperator(delta[None].to(dtype), torch.linalg.cholesky(z)[None].to(dtype), alpha=1.0, variance_scale=[1e-3])


@pytest.fixture(params=[False, True], ids=["classic", "one-exchange"])
def variant(request, monkeypatch):
    """Both LOBPCG variants on the CPU: the classic one (the CPU default) and the
    one-exchange one (the CUDA default; ``one_exchange=True`` in the request)."""
    import lora_da.solvers as solvers

    real = solvers.core()

    class Variant:
        def __getattr__(self, name):
            return getattr(real, name)

        def GuidanceRequest(self, **fields):  # noqa: N802 (the core's name)
            return real.GuidanceRequest(one_exchange=request.param, **fields)

    monkeypatch.setattr(solvers, "core", lambda: Variant())
    return request.param


def test_a_stagnating_problem_stops_before_max_iter(variant):
    """Z of condition 1e8 in float32, unpreconditioned: the residuals sit at a few times
    their threshold and stop falling (measured: 500 iterations before the rule, ~250
    with it). The solver gives up after a fifth of max_iter without progress
    (csrc/lobpcg.hpp, StagnationWatch) and reports converged=False, so that LoRA-DA's
    check redoes it densely instead of waiting for max_iter."""
    result = lobpcg(_unpreconditioned_problem(1e8, torch.float32), 4, max_iter=500)
    assert not bool(result.converged.any())
    assert int(result.iterations.max()) <= 400, result.iterations


def test_slow_steady_convergence_is_not_taken_for_stagnation(variant):
    """Z of condition 1e6 in float64, unpreconditioned: ~1150-1200 iterations, with
    residual plateaus of hundreds of iterations while the Ritz values fall. The
    stagnation rule must let it converge, to the accuracy of eigh."""
    op = _unpreconditioned_problem(1e6, torch.float64)
    result = lobpcg(op, 4, max_iter=1500)
    assert bool(result.converged.all()), result.iterations
    assert int(result.iterations.max()) > 300  # longer than the stagnation window (1500 / 5): the rule was exercised
    check_against_eigh(op.dense(), result, 4)


# --------------------------------------------------------------------------
# The named interface of the compiled core (DenseRequest / GuidanceRequest)
# --------------------------------------------------------------------------


def _core():
    from lora_da._native import core

    return core()


def _guidance_fields(batch=2, n=60, d_out=20, k=3, seed=4):
    """A valid GuidanceRequest's fields for a small LoRA-DA problem, and the tensors they point into."""
    delta, chol = lora_da_problem(batch, n, d_out, seed=seed)
    vectors = torch.empty(batch, k, n, dtype=torch.float64)
    tensors = dict(delta=delta.contiguous(), chol=chol.contiguous(), vectors=vectors)
    fields = dict(
        delta=tensors["delta"].data_ptr(), delta_column_major=False, d_out=d_out, delta_stride=n * d_out,
        cholesky=tensors["chol"].data_ptr(), cholesky_stride=n * n, alpha=1.0, variance_scale=[0.03] * batch,
        batch=batch, n=n, dtype="float64", k=k, guard=None, largest=False, tol=None, max_iter=500, seed=0,
        eigenvectors=vectors.data_ptr(), device="cpu", stream=0,
    )
    return fields, tensors


def _one_line(excinfo):
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


def test_named_requests_match_eigh_on_random_spd_problems():
    """DenseRequest/GuidanceRequest built by hand: the answer of torch.linalg.eigh, and
    bitwise what lora_da.solvers.lobpcg returns (which builds the same requests)."""
    core = _core()
    for seed, (batch, n, k) in enumerate([(3, 90, 4), (2, 160, 6)]):
        a = symmetric(batch, n, seed=100 + seed, spd=True)
        vectors = torch.empty(batch, k, n, dtype=torch.float64)
        request = core.DenseRequest(
            matrices=a.data_ptr(), matrix_stride=n * n, batch=batch, n=n, dtype="float64", k=k, guard=None,
            largest=False, tol=None, max_iter=500, seed=0, eigenvectors=vectors.data_ptr(), device="cpu", stream=0,
        )
        report = core.lobpcg_dense(request)
        assert all(report["converged"]) and not report["dense_fallback"]
        ours = vectors.transpose(-1, -2)
        values = torch.tensor(report["eigenvalues"], dtype=torch.float64).reshape(batch, k)
        reference = lobpcg(a, k)
        assert torch.equal(ours, reference.eigenvectors) and torch.equal(values, reference.eigenvalues)
        check_against_eigh(a, reference, k)

    fields, tensors = _guidance_fields()
    report = core.lobpcg_guidance(core.GuidanceRequest(**fields))
    op = LoraDAOperator(tensors["delta"], tensors["chol"], alpha=1.0, variance_scale=0.03)
    reference = lobpcg(op, 3)
    assert torch.equal(tensors["vectors"].transpose(-1, -2), reference.eigenvectors)
    assert report["eigenvalues"] == reference.eigenvalues.reshape(-1).tolist()
    check_against_eigh(op.dense(), reference, 3)


# Fields without which a solve is not described: each must be passed by name.
GUIDANCE_REQUIRED = {
    "delta", "delta_column_major", "d_out", "delta_stride", "cholesky", "cholesky_stride", "alpha",
    "variance_scale", "batch", "n", "dtype", "k", "guard", "largest", "tol", "max_iter", "seed",
    "eigenvectors", "device", "stream",
}


def test_request_fields_are_required():
    core = _core()
    assert set(core.GuidanceRequest.required_fields) == GUIDANCE_REQUIRED
    assert set(core.DenseRequest.required_fields) == (GUIDANCE_REQUIRED - {
        "delta", "delta_column_major", "d_out", "delta_stride", "cholesky", "cholesky_stride", "alpha",
        "variance_scale"}) | {"matrices", "matrix_stride"}
    fields, _ = _guidance_fields()
    for name in sorted(GUIDANCE_REQUIRED):
        partial = {key: value for key, value in fields.items() if key != name}
        with pytest.raises(TypeError, match=f"GuidanceRequest: missing field\\(s\\) '{name}'$") as excinfo:
            core.GuidanceRequest(**partial)
        _one_line(excinfo)


def test_misspelled_request_field_is_an_error():
    core = _core()
    fields, _ = _guidance_fields()
    fields["cholesky_strid"] = fields.pop("cholesky_stride")
    with pytest.raises(TypeError, match="GuidanceRequest: unknown field 'cholesky_strid'") as excinfo:
        core.GuidanceRequest(**fields)
    _one_line(excinfo)
    fields["cholesky_stride"] = fields.pop("cholesky_strid")
    request = core.GuidanceRequest(**fields)
    with pytest.raises(AttributeError):
        request.cholesky_strid = 0
    with pytest.raises(TypeError, match="keyword arguments only"):
        core.GuidanceRequest(fields["delta"])
    assert request.cholesky_stride == fields["cholesky_stride"] and "cholesky_stride=3600" in repr(request)


@pytest.mark.parametrize(
    "name,value,expected",
    [
        ("n", 60.0, "GuidanceRequest.n must be an int, got float"),
        ("k", True, "GuidanceRequest.k must be an int, got bool"),
        ("delta_column_major", 0, "GuidanceRequest.delta_column_major must be a bool, got int"),
        ("alpha", "1", "GuidanceRequest.alpha must be a float, got str"),
        ("variance_scale", 0.03, "GuidanceRequest.variance_scale must be a list of floats, got float"),
        ("variance_scale", [0.03, "x"], r"GuidanceRequest.variance_scale\[1\] must be a float, got str"),
        ("dtype", torch.float64, "GuidanceRequest.dtype must be a str, got torch.dtype"),
        ("seed", -1, "GuidanceRequest.seed=-1 must be >= 0"),
        ("delta_stride", 2**70, "GuidanceRequest.delta_stride=.* does not fit in 64 bits"),
    ],
)
def test_request_field_of_the_wrong_type(name, value, expected):
    core = _core()
    fields, _ = _guidance_fields()
    fields[name] = value
    with pytest.raises((TypeError, ValueError), match=expected) as excinfo:
        core.GuidanceRequest(**fields)
    _one_line(excinfo)
    request = core.GuidanceRequest(**_guidance_fields()[0])
    with pytest.raises((TypeError, ValueError), match=expected):  # the same check on assignment
        setattr(request, name, value)


@pytest.mark.parametrize(
    "changes,expected",
    [
        (dict(k=0), r"GuidanceRequest.k=0 must lie in \[1, 60\]"),
        (dict(k=61), r"GuidanceRequest.k=61 must lie in \[1, 60\]"),
        (dict(batch=0), r"GuidanceRequest.batch=0 must lie in \[1, 2147483647\]"),
        (dict(n=2**31),
         r"GuidanceRequest.n=2147483648 must lie in \[1, 2147483647\] \(the 32-bit size range of BLAS\)"),
        (dict(d_out=0), r"GuidanceRequest.d_out=0 must lie in"),
        (dict(guard=-1), r"GuidanceRequest.guard=-1 must lie in \[0, 2147483647\]"),
        (dict(guard=2**31), r"GuidanceRequest.guard=2147483648 must lie in"),
        (dict(max_iter=-1), r"GuidanceRequest.max_iter=-1 must lie in \[0, "),
        (dict(tol=0.0), r"GuidanceRequest.tol=0.0+ must be finite and > 0"),
        (dict(tol=float("nan")), r"GuidanceRequest.tol=nan must be finite"),
        (dict(dtype="float16"), r"GuidanceRequest.dtype='float16' must be 'float32' or 'float64'"),
        (dict(device="tpu"), r"GuidanceRequest.device='tpu' must be 'cpu' or 'cuda'"),
        (dict(stream=7), r"GuidanceRequest.stream must be 0 on the CPU"),
        (dict(delta=0), r"GuidanceRequest.delta is a null address"),
        (dict(eigenvectors=0), r"GuidanceRequest.eigenvectors is a null address"),
        (dict(cholesky_stride=-5), r"GuidanceRequest.cholesky_stride=-5 must be >= 0"),
        (dict(alpha=float("inf")), r"GuidanceRequest.alpha=inf must be finite"),
        (dict(variance_scale=[0.03]), r"GuidanceRequest.variance_scale needs one value per problem \(batch=2\), got 1"),
        (dict(variance_scale=[0.03, float("nan")]), r"GuidanceRequest.variance_scale\[1\]=nan must be finite"),
        (dict(preconditioner_shift=[0.1, 0.1]), r"preconditioner_shift is given without preconditioner_cholesky"),
        (dict(preconditioner_cholesky=1, preconditioner_shift=[0.1]), r"preconditioner_shift needs one value per"),
        (dict(preconditioner_cholesky=1, preconditioner_shift=[0.1, 0.1], alpha=-1.0),
         r"GuidanceRequest.alpha=-1.0+ must be > 0 with a preconditioner"),
        (dict(initial_cols=2), r"GuidanceRequest.initial_cols=2 is given without initial"),
        (dict(initial=1, initial_cols=-1), r"GuidanceRequest.initial_cols=-1 must lie in"),
    ],
)
def test_bad_request_values_name_the_field(changes, expected):
    core = _core()
    fields, _ = _guidance_fields()
    with pytest.raises(ValueError, match=expected) as excinfo:
        core.GuidanceRequest(**{**fields, **changes})
    _one_line(excinfo)
    # fields stay writable: the solve checks them again
    request = core.GuidanceRequest(**fields)
    for name, value in changes.items():
        setattr(request, name, value)
    with pytest.raises(ValueError, match=expected):
        core.lobpcg_guidance(request)


def test_dense_request_values_are_checked():
    core = _core()
    a = symmetric(1, 30, seed=2)
    vectors = torch.empty(1, 2, 30, dtype=torch.float64)
    fields = dict(matrices=a.data_ptr(), matrix_stride=900, batch=1, n=30, dtype="float64", k=2, guard=None,
                  largest=False, tol=None, max_iter=500, seed=0, eigenvectors=vectors.data_ptr(), device="cpu",
                  stream=0)
    core.lobpcg_dense(core.DenseRequest(**fields))
    with pytest.raises(ValueError, match=r"DenseRequest.matrix_stride=-1 must be >= 0"):
        core.DenseRequest(**{**fields, "matrix_stride": -1})
    with pytest.raises(ValueError, match=r"DenseRequest.matrices is a null address"):
        core.DenseRequest(**{**fields, "matrices": 0})
    with pytest.raises(TypeError, match=r"DenseRequest: unknown field 'delta'"):
        core.DenseRequest(**fields, delta=1)


def test_guard_is_checked_and_block_sizes_are_64_bit():
    a = symmetric(2, 20, seed=6)
    with pytest.raises(ValueError, match=r"guard=-3 must lie in"):
        lobpcg(a, 2, guard=-3)
    with pytest.raises(ValueError, match=r"guard=4294967296 must lie in"):
        lobpcg(a, 2, guard=2**32)
    # 5 (k + guard) exceeds the int range: computed in 32 bits it wrapped around to a
    # negative number, and the solver tried to allocate a block of 5e8 vectors
    result = lobpcg(a, 2, guard=500_000_000)
    assert result.dense_fallback and result.block_size == 20
    check_against_eigh(a, result, 2, tol=1e-13)


@pytest.mark.parametrize(
    "kwargs,error,expected",
    [
        (dict(seed=-1), ValueError, r"^lobpcg: seed=-1 must lie in \[0, 2\*\*64 - 1\]$"),
        (dict(seed=2**64), ValueError, r"^lobpcg: seed=18446744073709551616 must lie in \[0, 2\*\*64 - 1\]$"),
        (dict(seed=True), TypeError, r"^lobpcg: seed must be an int, got bool \(True\)$"),
        (dict(seed=1.5), TypeError, r"^lobpcg: seed must be an int, got float \(1.5\)$"),
        (dict(guard=2**40), ValueError, r"^lobpcg: guard=1099511627776 must lie in \[0, 2147483647\]$"),
        (dict(guard=-1), ValueError, r"^lobpcg: guard=-1 must lie in \[0, 2147483647\]$"),
        (dict(guard=True), TypeError, r"^lobpcg: guard must be an int, got bool"),
        (dict(max_iter=True), TypeError, r"^lobpcg: max_iter must be an int, got bool \(True\)$"),
        (dict(max_iter=2.0), TypeError, r"^lobpcg: max_iter must be an int, got float"),
        (dict(max_iter=-1), ValueError, r"^lobpcg: max_iter=-1 must lie in \[0, 2147483647\]$"),
        (dict(max_iter=2**40), ValueError, r"^lobpcg: max_iter=1099511627776 must lie in"),
        (dict(tol="1e-3"), TypeError, r"^lobpcg: tol must be a float or None, got str"),
        (dict(tol=True), TypeError, r"^lobpcg: tol must be a float or None, got bool"),
        (dict(tol=float("nan")), ValueError, r"^lobpcg: tol must be finite and > 0 \(None = the default\), got nan$"),
        (dict(tol=float("inf")), ValueError, r"^lobpcg: tol must be finite and > 0"),
        (dict(tol=0.0), ValueError, r"^lobpcg: tol must be finite and > 0"),
        (dict(k=True), TypeError, r"^lobpcg: k must be an int, got bool \(True\)$"),
        (dict(k=2.5), TypeError, r"^lobpcg: k must be an int, got float \(2.5\)$"),
    ],
)
@pytest.mark.parametrize("form", ["dense", "operator"])
def test_lobpcg_arguments_are_checked_by_name(kwargs, error, expected, form):
    """A caller of lobpcg sees its own argument named in one line (not a core request's field,
    nor a bool or float silently taken as an int), before any work."""
    if form == "dense":
        problem = symmetric(2, 60, seed=3)
    else:
        delta, chol = lora_da_problem(2, 60, 20, seed=4)
        problem = LoraDAOperator(delta, chol, alpha=1.0, variance_scale=0.02)
    kwargs = {"k": 2, **kwargs}
    with pytest.raises(error, match=expected) as excinfo:
        lobpcg(problem, kwargs.pop("k"), **kwargs)
    _one_line(excinfo)


def test_lobpcg_takes_the_whole_seed_range():
    a = symmetric(1, 60, seed=5)
    for seed in (0, 2**63, 2**64 - 1):
        check_against_eigh(a, lobpcg(a, 2, seed=seed), 2)
