"""LoRA-DA's per-module float64 reference (lora_da/methods/lora_da_reference.py): steps 1-7 against
the dense oracle, and the damping escalation rule of prepare_input_factor (docs/math.md §5.1)."""

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

from helpers import (
    SharedInputMLP,
    lora_da_oracle_factors as oracle_factors,
    oracle_statistics,
    regression_batches,
    regression_loss,
    rel_err,
)

TOL = 1e-8


def test_subspace_matches_oracle_in_float64():
    """The float64 path before the final float32 cast, at 1e-8 relative."""
    model, loader = SharedInputMLP(), regression_batches()
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


# -- the damping escalation of prepare_input_factor -----------------------------------


def test_non_positive_definite_factor_escalates_damping_by_the_rule():
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    z = q @ torch.diag(torch.tensor([-1.5e-4, 1, 2, 3, 4, 5], dtype=torch.float64)) @ q.T
    prepared = prepare_input_factor(z, 1e-6, "layer.x")  # recorded, not warned: the solve sums the escalations up
    # rule: floor = max(λ, 1e-12·tr/d) = 1e-6 here; 1e-5 and 1e-4 fail, 1e-3 succeeds
    assert prepared.damping == pytest.approx(1e-3)
    torch.testing.assert_close(prepared.cholesky @ prepared.cholesky.T, z + 1e-3 * torch.eye(6, dtype=torch.float64))


def test_hopeless_factor_is_reported_not_used():
    z = torch.diag(torch.tensor([-1e6, 1.0], dtype=torch.float64))  # beyond λ·10^8
    with pytest.raises(FloatingPointError, match="module 'bad' is not positive definite"):
        prepare_input_factor(z, 1e-6, "bad")
    with pytest.raises(FloatingPointError):
        prepare_input_factor(torch.full((3, 3), float("nan"), dtype=torch.float64), 1e-6, "nan")


def test_rank_deficient_inputs_with_tiny_damping_escalate_and_are_recorded():
    """Dead input features and fewer tokens than d_in: Z is singular."""
    model = SharedInputMLP(d_in=12, d_hidden=7)
    data = regression_batches(num_samples=3, seq_len=2, d_in=12, batch_size=3)  # at most 6 tokens < 12
    data[0]["x"][..., :4] = 0.0  # dead features
    with pytest.warns(RuntimeWarning, match=r"^2 modules \(2 input groups\) needed more damping than damping=1e-30 .*for 'fc1a'; why: fewer tokens than d_in"):
        init = lora_da.initialize(model, data, rank=2, target_modules=["fc1a", "fc2"], damping=1e-30,
                                  loss_fn=regression_loss, train_size=10, progress=False)
    assert init.modules["fc1a"].damping > 1e-30
    assert init.modules["fc2"].damping >= 1e-30
    for m in init.modules.values():
        assert torch.isfinite(m.lora_A).all() and torch.isfinite(m.lora_B).all()


def test_damping_summary_names_count_worst_factor_and_cause():
    from lora_da.methods.lora_da_reference import DampingEscalation, damping_summary

    assert damping_summary([]) is None
    short = DampingEscalation(members=("l0.q", "l0.k"), requested=1e-6, used=1e-1, d_in=64, num_tokens=16)
    conditioned = DampingEscalation(members=("l0.down",), requested=1e-6, used=1e-4, d_in=32, num_tokens=100)
    message = damping_summary([conditioned, short])
    assert message.startswith("3 modules (2 input groups) needed more damping than damping=1e-06 to make Z positive definite")
    assert "up to 1e+05x (damping 0.1) for 'l0.q', shared with 1 more" in message
    assert "fewer tokens than d_in for 2 of them (16 calibration tokens < d_in 64" in message
    assert "ill-conditioning for 1 of them" in message
    assert "Use more calibration tokens or a larger damping=" in message
    only_conditioning = damping_summary([conditioned])
    assert "fewer tokens" not in only_conditioning and "1 module (1 input group)" in only_conditioning
