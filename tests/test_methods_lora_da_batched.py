"""lora_da/methods/lora_da_batched.py: the batched preparation of the fast path against the per-module reference of
``lora_da.methods.lora_da_reference`` and against plain float64 linear algebra.

Everything is float64; the batched and per-module paths differ only in the order
of operations inside LAPACK/BLAS calls, so they agree to ~1e-12 relative (σ from
the subspace iteration converges to ~1e-15 of σ here; its test bound is 1e-12).
"""

import warnings

import pytest
import torch

from lora_da.methods import lora_da_batched as batched
from lora_da.methods.lora_da_reference import prepare_input_factor, prepare_module


def _spd(n, condition, generator):
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=generator))
    return q @ torch.diag(torch.logspace(0, -condition, n, dtype=torch.float64)) @ q.T


@pytest.mark.parametrize("shape", [(40, 30), (150, 90), (90, 150), (200, 200)])
def test_spectral_norms_match_svdvals(shape):
    generator = torch.Generator().manual_seed(sum(shape))
    matrices = torch.randn(4, *shape, dtype=torch.float64, generator=generator)
    # one matrix whose two largest singular values are close (slow for power iteration)
    u, s, vh = torch.linalg.svd(matrices[0], full_matrices=False)
    s[1] = s[0] * (1 - 1e-3)
    matrices[0] = u @ torch.diag(s) @ vh
    expected = torch.linalg.svdvals(matrices)[:, 0]
    got = batched.spectral_norms_and_directions(matrices)[0]
    # float32 iterations to a residual of SUBSPACE_TOL (1e-5), then a float64 Rayleigh-Ritz step:
    # relative error ≲ tol²/relative gap, ≤ 1e-7 even for the 0.2% gap of matrices[0]
    # (σ only scales B₀, which is stored in float32: eps 6e-8)
    torch.testing.assert_close(got, expected, rtol=1e-7, atol=0)


@pytest.mark.parametrize("shape", [(150, 90), (90, 150)])
@pytest.mark.parametrize("column_major", [False, True])
def test_spectral_directions_span_the_top_left_singular_vector(shape, column_major):
    generator = torch.Generator().manual_seed(7)
    u, _ = torch.linalg.qr(torch.randn(3, shape[0], min(shape), dtype=torch.float64, generator=generator))
    v, _ = torch.linalg.qr(torch.randn(3, shape[1], min(shape), dtype=torch.float64, generator=generator))
    singular = torch.logspace(0, -3, min(shape), dtype=torch.float64)
    matrices = u @ torch.diag(singular) @ v.mT
    if column_major:
        matrices = matrices.mT.contiguous().mT
    values, directions = batched.spectral_norms_and_directions(matrices)
    torch.testing.assert_close(values, torch.ones(3, dtype=torch.float64), rtol=1e-7, atol=0)
    assert directions.shape == (3, shape[0], batched.SUBSPACE_BLOCK)
    top = u[:, :, :1].to(directions.dtype)
    captured = (directions.mT @ top).norm(dim=(-2, -1))  # ‖projection of u₁ on the block‖
    assert bool((captured > 1 - 1e-4).all()), captured


def test_spectral_norms_fall_back_to_the_gram_matrix(monkeypatch):
    """Problems the subspace iteration does not converge on get the float64 Gram eigenvalue."""
    monkeypatch.setattr(batched, "SUBSPACE_MAX_ITER", 1)
    generator = torch.Generator().manual_seed(11)
    for shape in [(150, 90), (90, 150)]:
        matrices = torch.randn(3, *shape, dtype=torch.float64, generator=generator)
        expected = torch.linalg.svdvals(matrices)[:, 0]
        torch.testing.assert_close(batched.spectral_norms_and_directions(matrices)[0], expected, rtol=1e-12, atol=0)


def test_batched_preparation_equals_the_per_module_reference():
    generator = torch.Generator().manual_seed(3)
    n, d_out, damping, train_size = 70, 50, 1e-6, 500
    raw = {0: _spd(n, 7, generator), 1: _spd(n, 3, generator), 2: _spd(n, 1, generator) * 5}
    # a rank-deficient Z (fewer tokens than d_in) that needs the damping escalation
    rows = torch.randn(20, n, dtype=torch.float64, generator=generator)
    raw[3] = rows.T @ rows / 20 - 1e-3 * torch.eye(n, dtype=torch.float64)
    names = {group: f"layer{group}.proj" for group in raw}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the escalation is recorded, not warned about here (the solve sums it up)
        factors = batched.prepare_input_factors(raw, names, damping)
        reference = {g: prepare_input_factor(z, damping, names[g]) for g, z in raw.items()}
    for group in raw:
        assert factors[group].damping == reference[group].damping
        # two float64 factorizations of one matrix (upper vs lower LAPACK variant): they agree
        # to a few n·ε·‖L‖ (n = 70)
        torch.testing.assert_close(factors[group].cholesky, reference[group].cholesky, rtol=1e-10, atol=1e-12)
    assert factors[3].damping > damping

    modules = {f"layers.{i}.m": i % 4 for i in range(6)}
    gradients = {m: torch.randn(d_out, n, dtype=torch.float64, generator=generator) for m in modules}
    output_diags = {m: torch.rand(d_out, dtype=torch.float64, generator=generator) for m in modules}
    scale = 0.25
    batches = batched.solve_batches({m: tuple(gradients[m].shape) for m in modules})
    assert batches == [list(modules)]  # one shape, one kind (layers.*.m): one batch
    prepared = batched.prepare_modules(
        batches, gradients, output_diags, {m: factors[g] for m, g in modules.items()},
        damping=damping, train_size=train_size, gradient_scale=scale,
    )
    for name, group in modules.items():
        expected = prepare_module(
            name, gradients[name] * scale, reference[group], output_diags[name], damping=damping, train_size=train_size
        )
        # σ: float32 subspace iteration + float64 Rayleigh-Ritz (see test_spectral_norms_match_svdvals)
        assert abs(prepared[name].sigma - expected.sigma) <= 1e-7 * expected.sigma, name
        assert abs(prepared[name].variance_scale - expected.variance_scale) <= 1e-10 * expected.variance_scale
        torch.testing.assert_close(prepared[name].delta_hat, expected.delta_hat, rtol=1e-7, atol=1e-12)


def test_zero_gradient_is_reported_by_name():
    z = {0: torch.eye(8, dtype=torch.float64)}
    factors = batched.prepare_input_factors(z, {0: "a"}, 1e-6)
    with pytest.raises(FloatingPointError, match="module 'dead'"):
        batched.prepare_modules(
            [["dead"]], {"dead": torch.zeros(4, 8)}, {"dead": torch.ones(4)}, {"dead": factors[0]},
            damping=1e-6, train_size=10,
        )


def test_preconditioner_factor_gives_the_inverse_it_stands_for():
    generator = torch.Generator().manual_seed(5)
    n, alpha = 60, 0.7
    raw = {0: _spd(n, 6, generator), 1: _spd(n, 2, generator)}
    factors = batched.prepare_input_factors(raw, {0: "a", 1: "b"}, 1e-6)
    scales = {0: 1e-3, 1: 0.2}
    cholesky = batched.guidance_preconditioners(factors, scales, alpha)
    eye = torch.eye(n, dtype=torch.float64)
    for group, factor in factors.items():
        shifted = cholesky[group] @ cholesky[group].T
        torch.testing.assert_close(shifted, scales[group] * eye + alpha * factor.matrix, rtol=1e-12, atol=1e-14)
        p = (eye - scales[group] * torch.cholesky_inverse(cholesky[group])) / alpha
        exact = torch.linalg.inv(scales[group] * torch.linalg.inv(factor.matrix) + alpha * eye)
        assert (p - exact).abs().max() <= 1e-8 * exact.abs().max()

    # in place (the fast path): the same factors, and Z's storage is consumed
    matrices = {group: factor.matrix.clone() for group, factor in factors.items()}
    in_place = batched.guidance_preconditioners(factors, scales, alpha, overwrite_matrices=True)
    for group, factor in factors.items():
        assert factor.matrix is None
        torch.testing.assert_close(in_place[group], cholesky[group], rtol=0, atol=0)
        torch.testing.assert_close(factor.cholesky @ factor.cholesky.T, matrices[group], rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="already overwritten"):
        batched.guidance_preconditioners(factors, scales, alpha, overwrite_matrices=True)


def test_stack_views_equals_stack_and_avoids_copies():
    base = torch.randn(9, 5, 5, dtype=torch.float64)
    cases = {
        "every third": [base[i] for i in (1, 4, 7)],  # equally spaced: a view
        "repeated": [base[2]] * 3,  # spacing 0: a view
        "uneven": [base[i] for i in (0, 1, 5)],  # a copy
        "transposed": [base[i].mT for i in (0, 1, 2)],  # one layout, equally spaced: a view
        "mixed layouts": [base[0], base[1].mT, base[2]],  # a copy
        "separate": [torch.randn(5, 5, dtype=torch.float64) for _ in range(3)],
    }
    for what, tensors in cases.items():
        stacked = batched.stack_views(tensors)
        assert torch.equal(stacked, torch.stack(tensors)), what
        shares = stacked.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()
        assert shares == (what in ("every third", "repeated", "transposed")), what


def test_lobpcg_reads_strided_factor_batches():
    """A strided view of Cholesky factors (what stack_views makes) gives the same eigenpairs as a copy."""
    from lora_da.solvers import LoraDAOperator, lobpcg

    generator = torch.Generator().manual_seed(4)
    n, d_out = 60, 20
    raw = {g: _spd(n, 2 + g, generator) for g in range(6)}
    factors = batched.prepare_input_factors(raw, {g: f"m{g}" for g in raw}, 1e-6)
    chosen = [factors[g].cholesky for g in (0, 2, 4)]
    view = batched.stack_views(chosen)
    assert view.untyped_storage().data_ptr() == chosen[0].untyped_storage().data_ptr()
    delta = torch.randn(3, n, d_out, dtype=torch.float64, generator=generator)
    delta /= torch.linalg.matrix_norm(delta, ord=2)[:, None, None]
    column_major = delta.mT.contiguous().mT  # the layout cholesky_solve returns Δ in
    assert column_major.stride()[1:] == (1, n)
    scales = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    results = [
        lobpcg(LoraDAOperator(delta=d, cholesky=c, alpha=1.0, variance_scale=s), 4)
        for d, c, s in (
            (delta, view, scales), (delta, torch.stack(chosen), scales), (column_major, view, scales),
            (column_major[::2], view[::2], scales[::2]),
        )
    ]
    torch.testing.assert_close(results[0].eigenvalues, results[1].eigenvalues, rtol=1e-12, atol=0)
    # the column-major layout changes the products' rounding, hence where LOBPCG stops (tol 1e-10)
    torch.testing.assert_close(results[2].eigenvalues, results[1].eigenvalues, rtol=1e-9, atol=0)
    torch.testing.assert_close(results[3].eigenvalues, results[1].eigenvalues[::2], rtol=1e-9, atol=0)
    dense = LoraDAOperator(delta=delta, cholesky=torch.stack(chosen), alpha=1.0, variance_scale=[0.1, 0.2, 0.3]).dense()
    torch.testing.assert_close(results[0].eigenvalues, torch.linalg.eigvalsh(dense)[:, :4], rtol=1e-8, atol=1e-10)


def test_lobpcg_start_block_is_used_and_changes_nothing_but_the_iterations():
    from lora_da.solvers import LoraDAOperator, lobpcg

    generator = torch.Generator().manual_seed(8)
    n, d_out, k = 120, 40, 4
    raw = {g: _spd(n, 3, generator) for g in range(2)}
    factors = batched.prepare_input_factors(raw, {g: f"m{g}" for g in raw}, 1e-6)
    delta = torch.randn(2, n, d_out, dtype=torch.float64, generator=generator)
    delta /= torch.linalg.matrix_norm(delta, ord=2)[:, None, None]
    operator = LoraDAOperator(
        delta=delta, cholesky=torch.stack([factors[0].cholesky, factors[1].cholesky]), alpha=1.0, variance_scale=0.05
    )
    values, vectors = torch.linalg.eigh(operator.dense())
    random_start = lobpcg(operator, k)
    exact_start = lobpcg(operator, k, initial=vectors[..., :k])
    for result in (random_start, exact_start):
        assert bool(result.converged.all())
        torch.testing.assert_close(result.eigenvalues, values[:, :k], rtol=1e-9, atol=1e-12)
    assert int(exact_start.iterations.max()) <= 1 < int(random_start.iterations.min())
    with pytest.raises(ValueError, match="initial must be"):
        lobpcg(operator, k, initial=vectors[0, :, :k])
