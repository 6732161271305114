"""The batched preparation of the fast path against the per-module reference of
``lora_da.method`` and against plain float64 linear algebra.

Everything is float64; the batched and per-module paths differ only in the order
of operations inside LAPACK/BLAS calls, so they agree to ~1e-12 relative (σ from
the subspace iteration converges to ~1e-15 of σ here; its test bound is 1e-12).
"""

import pytest
import torch

from lora_da import batched
from lora_da.method import prepare_input_factor, prepare_module


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
    got = batched.spectral_norms(matrices)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)


def test_batched_preparation_equals_the_per_module_reference():
    generator = torch.Generator().manual_seed(3)
    n, d_out, damping, train_size = 70, 50, 1e-6, 500
    raw = {0: _spd(n, 7, generator), 1: _spd(n, 3, generator), 2: _spd(n, 1, generator) * 5}
    # a rank-deficient Z (fewer tokens than d_in) that needs the damping escalation
    rows = torch.randn(20, n, dtype=torch.float64, generator=generator)
    raw[3] = rows.T @ rows / 20 - 1e-3 * torch.eye(n, dtype=torch.float64)
    names = {group: f"layer{group}.proj" for group in raw}
    with pytest.warns(RuntimeWarning, match="layer3.proj"):
        factors = batched.prepare_input_factors(raw, names, damping)
    with pytest.warns(RuntimeWarning, match="layer3.proj"):
        reference = {g: prepare_input_factor(z, damping, names[g]) for g, z in raw.items()}
    for group in raw:
        assert factors[group].damping == reference[group].damping
        torch.testing.assert_close(factors[group].cholesky, reference[group].cholesky, rtol=1e-12, atol=1e-14)
    assert factors[3].damping > damping

    modules = {f"m{i}": i % 4 for i in range(6)}
    gradients = {m: torch.randn(d_out, n, dtype=torch.float64, generator=generator) for m in modules}
    output_diags = {m: torch.rand(d_out, dtype=torch.float64, generator=generator) for m in modules}
    scale = 0.25
    prepared = batched.prepare_modules(
        list(modules), gradients, output_diags, {m: factors[g] for m, g in modules.items()},
        damping=damping, train_size=train_size, gradient_scale=scale,
    )
    for name, group in modules.items():
        expected = prepare_module(
            name, gradients[name] * scale, reference[group], output_diags[name], damping=damping, train_size=train_size
        )
        assert abs(prepared[name].sigma - expected.sigma) <= 1e-12 * expected.sigma, name
        assert abs(prepared[name].variance_scale - expected.variance_scale) <= 1e-10 * expected.variance_scale
        torch.testing.assert_close(prepared[name].delta_hat, expected.delta_hat, rtol=1e-10, atol=1e-12)


def test_zero_gradient_is_reported_by_name():
    z = {0: torch.eye(8, dtype=torch.float64)}
    factors = batched.prepare_input_factors(z, {0: "a"}, 1e-6)
    with pytest.raises(FloatingPointError, match="module 'dead'"):
        batched.prepare_modules(
            ["dead"], {"dead": torch.zeros(4, 8)}, {"dead": torch.ones(4)}, {"dead": factors[0]},
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
