"""LoRA-DA against an independent float64 oracle.

The oracle recomputes G, Z and y token by token with explicit loops and
hand-derived gradients of a two-layer network (no autograd, no hooks), then
Δ, σ, c, Ω and A₀ from SPEC.md's formulas with explicit inverses and dense eigh.
Everything is float64, so agreement is expected to ~1e-10; we assert 1e-8
relative (eigenvectors lose a few digits to the eigen-gap).
"""

import math

import pytest
import torch

import lora_da
from lora_da.methods.lora_da_reference import (
    dense_eigenpairs,
    prepare_input_factor,
    prepare_module,
    subspace_from_eigenpairs,
)
from lora_da.targets import find_target_modules

from helpers import SharedInputMLP, oracle_statistics, principal_angle, regression_batches, regression_loss

TOL = 1e-8


def oracle_factors(G, Z, y, *, rank, alpha, beta, gamma, damping, train_size):
    """SPEC.md steps 1-7 with explicit inverses and dense eigh."""
    eye = torch.eye(Z.shape[0], dtype=torch.float64)
    Z_damped = Z + damping * eye
    Z_inv = torch.linalg.inv(Z_damped)
    delta = -Z_inv @ G.T @ torch.diag(1.0 / (y + damping))
    sigma = torch.linalg.svdvals(delta)[0]
    delta_hat = delta / sigma
    c = (1.0 / (y + damping)).sum() / train_size / sigma**2
    omega = -alpha * delta_hat @ delta_hat.T + beta * c * Z_inv
    values, vectors = torch.linalg.eigh(omega)
    A0 = vectors[:, :rank]
    for j in range(rank):  # sign: largest-magnitude entry positive
        k = int(A0[:, j].abs().argmax())
        if A0[k, j] < 0:
            A0[:, j] = -A0[:, j]
    B0 = A0.T @ delta_hat
    return A0.T / math.sqrt(gamma), B0.T / math.sqrt(gamma), values[:rank], float(sigma)


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture
def mlp_setup():
    model = SharedInputMLP()
    loader = regression_batches()
    return model, loader


def test_statistics_match_token_loop(mlp_setup):
    model, loader = mlp_setup
    G, Z, y, samples, tokens = oracle_statistics(model, loader)
    modules = find_target_modules(model, ["fc1a", "fc1b", "fc2"], rank=1)
    stats = lora_da.collect_statistics(model, loader, modules, loss_fn=regression_loss)
    assert stats.num_samples == samples and stats.num_tokens == tokens
    for name in ("fc1a", "fc1b", "fc2"):
        assert rel_err(stats.gradient(name), G[name]) < 1e-12, name
        assert rel_err(stats.input_factor(name), Z[name]) < 1e-12, name
        assert rel_err(stats.output_factor_diag(name), y[name]) < 1e-12, name
    groups = sorted(tuple(sorted(g.members)) for g in stats.groups)
    assert groups == [("fc1a", "fc1b"), ("fc2",)]


@pytest.mark.parametrize(
    "rank,beta,train_size", [(2, 0.03, 100), (3, 1.0, 4), (4, 50.0, 2)]
)  # from bias-dominated to variance-dominated Ω
def test_factors_match_oracle(mlp_setup, rank, beta, train_size):
    model, loader = mlp_setup
    G, Z, y, _, _ = oracle_statistics(model, loader)
    init = lora_da.initialize(
        model, loader, rank, target_modules=["fc1a", "fc1b", "fc2"], beta=beta, alpha=1.0,
        gamma=16.0, damping=1e-6, train_size=train_size, loss_fn=regression_loss, progress=False,
    )
    for name in ("fc1a", "fc1b", "fc2"):
        lora_A, lora_B, values, sigma = oracle_factors(
            G[name], Z[name], y[name], rank=rank, alpha=1.0, beta=beta, gamma=16.0, damping=1e-6, train_size=train_size
        )
        got = init.modules[name]
        assert got.lora_A.dtype == torch.float32 and got.lora_B.dtype == torch.float32
        # factors are returned in float32: compare at float32 resolution ...
        assert rel_err(got.lora_A.double(), lora_A) < 1e-6, name
        assert rel_err(got.lora_B.double(), lora_B) < 1e-6, name
        # ... and the float64 quantities at 1e-8.
        assert rel_err(got.eigenvalues, values) < TOL, name
        assert abs(got.sigma - sigma) / sigma < TOL, name


def test_subspace_matches_oracle_in_float64(mlp_setup):
    """The float64 path before the final float32 cast, at 1e-8 relative."""
    model, loader = mlp_setup
    G, Z, y, _, _ = oracle_statistics(model, loader)
    stats = lora_da.collect_statistics(
        model, loader, find_target_modules(model, ["fc1a", "fc2"], rank=2), loss_fn=regression_loss
    )
    for name in ("fc1a", "fc2"):
        factor = prepare_input_factor(stats.input_factor(name), 1e-6, name)
        prepared = prepare_module(
            name, stats.gradient(name), factor, stats.output_factor_diag(name), damping=1e-6, train_size=4
        )
        eigenvalues, vectors = dense_eigenpairs(prepared, factor, rank=2, alpha=1.0, beta=1.0)
        subspace = subspace_from_eigenpairs(prepared, eigenvalues, vectors)
        lora_A, lora_B, _, _ = oracle_factors(
            G[name], Z[name], y[name], rank=2, alpha=1.0, beta=1.0, gamma=1.0, damping=1e-6, train_size=4
        )
        assert rel_err(subspace.input_basis.T, lora_A) < TOL, name
        assert rel_err(subspace.output_basis.T, lora_B) < TOL, name


def test_beta_zero_gives_top_singular_vectors(mlp_setup):
    """β=0: A₀ spans the top-r left singular vectors of Δ̂ and B₀ = A₀ᵀΔ̂."""
    model, loader = mlp_setup
    rank, gamma = 3, 4.0
    init = lora_da.initialize(model, loader, rank, target_modules=["fc1a", "fc2"], beta=0.0, gamma=gamma,
                              loss_fn=regression_loss, train_size=10, progress=False)
    G, Z, y, _, _ = oracle_statistics(model, loader)
    for name in ("fc1a", "fc2"):
        delta = -torch.linalg.inv(Z[name] + 1e-6 * torch.eye(Z[name].shape[0], dtype=torch.float64)) @ G[name].T
        delta = delta / (y[name] + 1e-6)
        U, S, Vh = torch.linalg.svd(delta / torch.linalg.svdvals(delta)[0])
        A0 = init.modules[name].lora_A.double().T * math.sqrt(gamma)
        assert principal_angle(A0, U[:, :rank]) < 1e-5, name
        # B₀ᵀ = Δ̂ᵀA₀: its columns have norms S[:rank]
        B0 = init.modules[name].lora_B.double() * math.sqrt(gamma)
        torch.testing.assert_close(B0.norm(dim=0), S[:rank], rtol=1e-5, atol=0)
        torch.testing.assert_close(-init.modules[name].eigenvalues, S[:rank] ** 2, rtol=1e-8, atol=1e-12)
