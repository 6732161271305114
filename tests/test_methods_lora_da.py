"""``method="lora-da"`` (lora_da/methods/lora_da.py) against an independent float64 oracle.

The oracle recomputes G, Z and y token by token with explicit loops and
hand-derived gradients of a two-layer network (no autograd, no hooks:
helpers.oracle_statistics), then Δ, σ, c, Ω and A₀ from docs/math.md's formulas
with explicit inverses and dense eigh (helpers.lora_da_oracle_factors).
Everything is float64, so agreement is expected to ~1e-10; we assert 1e-8
relative (eigenvectors lose a few digits to the eigen-gap).
"""

import math
import warnings

import pytest
import torch

import lora_da

from helpers import (
    SharedInputMLP,
    lora_da_oracle_factors as oracle_factors,
    oracle_statistics,
    principal_angle,
    regression_batches,
    regression_loss,
    rel_err,
)

TOL = 1e-8


@pytest.fixture
def mlp_setup():
    model = SharedInputMLP()
    loader = regression_batches()
    return model, loader


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


# -- damping escalations: one summary warning per initialize call -----------------------


def _sixteen_tokens():
    """16 calibration tokens (2 samples of 8): fewer than every d_in of the tiny Llama (32, 64)."""
    from lora_da.models import batches, synthetic_samples

    return list(batches(synthetic_samples(2, min_len=8, max_len=8, seed=3), 2))


# Z accumulates in float64: with 16 tokens its null space shows eigenvalues of ~±1e-16·λ_max,
# which a damping of 1e-12 covers (Z + 1e-12·I is positive definite in exact arithmetic and in
# float64). 1e-20 is below that rounding: the factorization fails and the damping escalates.
TINY_DAMPING = 1e-20


def _runtime_warnings(call):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = call()
    return result, [w for w in caught if issubclass(w.category, RuntimeWarning)]


@pytest.mark.parametrize("solver", ["auto", "eigh"])
def test_damping_escalations_give_one_warning_at_the_callers_line(solver):
    from lora_da.models import tiny_llama
    from lora_da.user_warnings import DampingWarning

    init, caught = _runtime_warnings(lambda: lora_da.initialize(
        tiny_llama(), _sixteen_tokens(), rank=2, train_size=10, damping=TINY_DAMPING, solver=solver, progress=False
    ))
    assert init.num_tokens == 16
    raised = {name: m.damping / TINY_DAMPING for name, m in init.modules.items() if m.damping > TINY_DAMPING}
    assert len(raised) > 1  # several modules escalated ...
    assert len(caught) == 1  # ... one warning
    warning = caught[0]
    assert warning.category is DampingWarning and warning.filename == __file__
    message = str(warning.message)
    worst = max(raised, key=raised.get)
    assert message.startswith(f"{len(raised)} modules (")
    assert f"needed more damping than damping={TINY_DAMPING:g}" in message
    assert f"up to {raised[worst]:.3g}x (damping {init.modules[worst].damping:g}) for '{worst}'" in message
    assert "fewer tokens than d_in" in message and "16 calibration tokens < d_in 32..64" in message
    assert "more calibration tokens or a larger damping=" in message


def test_several_passes_give_one_damping_warning_per_initialize_call():
    """max_memory splits the model into passes; the driver (pipeline.run) sums every
    pass up in one warning, at the caller's line."""
    from lora_da.models import tiny_llama

    def call():
        return lora_da.initialize(tiny_llama(), _sixteen_tokens(), rank=2, train_size=10, damping=TINY_DAMPING,
                                  max_memory=200_000, progress=False)  # statistics + the solve reserve (131 KB)

    init, caught = _runtime_warnings(call)
    assert init.passes > 1
    raised = [name for name, m in init.modules.items() if m.damping > TINY_DAMPING]
    assert len(caught) == 1 and caught[0].filename == __file__
    assert str(caught[0].message).startswith(f"{len(raised)} modules (")


def test_no_escalation_no_warning(mlp_setup):
    model, loader = mlp_setup
    init, caught = _runtime_warnings(lambda: lora_da.initialize(
        model, loader, 2, target_modules=["fc1a", "fc2"], loss_fn=regression_loss, train_size=10, progress=False
    ))
    assert caught == [] and all(m.damping == 1e-6 for m in init.modules.values())


# -- the solve's working set: one unit of input groups at a time -------------------------


@pytest.fixture(scope="module")
def llama_statistics():
    from lora_da.models import batches, synthetic_samples, tiny_llama
    from lora_da.targets import find_target_modules

    model = tiny_llama(hidden_size=32, intermediate_size=64, num_layers=3)
    data = list(batches(synthetic_samples(16, min_len=12, max_len=16), 4))
    return lora_da.collect_statistics(model, data, find_target_modules(model, None, 2))


def _context(stats, budget):
    from lora_da.methods.base import NoOptions, SolveContext

    return SolveContext(
        settings=lora_da.LoraDAConfig(rank=2, progress=False), options=NoOptions(), targets={},
        names=list(stats.modules), statistics=stats, train_size=100, timings={}, solve_memory_budget=budget,
    )


def test_solve_units_keep_input_groups_and_solver_batches_whole(llama_statistics):
    from lora_da.methods.lora_da import solve_units
    from lora_da.methods.lora_da_batched import solve_batches

    stats = llama_statistics
    context = _context(stats, None)
    units = solve_units(context)
    assert sorted(n for unit in units for n in unit) == sorted(context.names)
    unit_of = {name: index for index, unit in enumerate(units) for name in unit}
    for group in stats.groups:
        assert len({unit_of[m] for m in group.members}) == 1, group.members
    for batch in solve_batches({n: tuple(stats.modules[n].grad_sum.shape) for n in context.names}):
        assert len({unit_of[n] for n in batch}) == 1, batch
    # the Llama's kinds joined by shared inputs: q/k/v, o, gate/up, down
    assert len(units) == 4


@pytest.mark.parametrize("tight", [True, False])
def test_a_budget_cuts_units_into_runs_of_input_groups_with_the_same_answer(llama_statistics, tight):
    from lora_da.methods import lora_da as method

    stats = llama_statistics
    unlimited = method.solve(_context(stats, None)).modules
    everything = _context(stats, None)
    sizes = sorted(method.working_set_bytes(everything, [g]) for g in range(len(stats.groups)))
    budget = 1 if tight else sizes[-1] + sizes[-2]  # tight: one group per unit; else: any two groups fit
    context = _context(stats, budget)
    units = method.solve_units(context)
    groups_of = [sorted({stats.modules[n].group_index for n in unit}) for unit in units]
    if tight:
        assert all(len(groups) == 1 for groups in groups_of) and len(units) == len(stats.groups)
    else:
        assert 4 < len(units) < len(stats.groups) and max(len(groups) for groups in groups_of) >= 2
        assert all(len(groups) == 1 or method.working_set_bytes(context, groups) <= budget for groups in groups_of)
    budgeted = method.solve(context).modules
    for name, module in unlimited.items():
        assert principal_angle(budgeted[name].lora_A.double().T, module.lora_A.double().T) < 1e-6, name
        torch.testing.assert_close(budgeted[name].eigenvalues, module.eigenvalues, rtol=1e-8, atol=1e-12)


def test_a_float32_model_resumes_its_mixed_precision_checkpoint(tmp_path):
    """Z in float64, G and y in float32 (statistics_precision="auto"): the checkpoint holds
    both dtypes and a rerun reads it back (it used to require G's dtype to be Z's)."""
    from lora_da.models import batches, synthetic_samples, tiny_llama

    data = list(batches(synthetic_samples(8), 4))
    path = str(tmp_path / "stats.safetensors")
    first = lora_da.initialize(tiny_llama(), data, rank=2, train_size=10, stats_checkpoint=path,
                               checkpoint_every=1, progress=False)
    again = lora_da.initialize(tiny_llama(), data, rank=2, train_size=10, stats_checkpoint=path,
                               checkpoint_every=1, progress=False)
    for name, module in first.modules.items():
        torch.testing.assert_close(again.modules[name].lora_A, module.lora_A, rtol=0, atol=0)
