"""bench/convergence/study_stats.py and the energy measure of study_inits, against independent oracles.

Oracles: scipy's ``binomtest`` (Wilson interval, the exact binomial p-value that McNemar's
exact test is), a plain loop over all resamples of a two-sample set (the bootstrap's
distribution), and the energy ratio recomputed from an eigendecomposition of Z.
"""

from __future__ import annotations

import itertools
import math
import pathlib
import sys

import pytest
import torch

scipy_stats = pytest.importorskip("scipy.stats")

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "bench" / "convergence"))
import study_inits  # noqa: E402
from study_stats import mcnemar_exact_p, paired_bootstrap_diff, wilson_interval  # noqa: E402


@pytest.mark.parametrize("correct,n", [(0, 128), (1, 128), (7, 128), (64, 128), (128, 128), (3, 10)])
def test_wilson_matches_scipy(correct, n):
    ci = scipy_stats.binomtest(correct, n).proportion_ci(confidence_level=0.95, method="wilson")
    low, high = wilson_interval(correct, n)
    assert low == pytest.approx(ci.low, abs=1e-12)  # closed forms, rounding only
    assert high == pytest.approx(ci.high, abs=1e-12)


def test_wilson_rejects_impossible_counts():
    with pytest.raises(ValueError, match="correct must lie"):
        wilson_interval(5, 4)


@pytest.mark.parametrize("b,c,same", [(0, 0, 5), (3, 0, 10), (5, 9, 100), (12, 12, 3), (1, 20, 0)])
def test_mcnemar_matches_binomial_test(b, c, same):
    first = [True] * b + [False] * c + [True] * same + [False] * same
    second = [False] * b + [True] * c + [True] * same + [False] * same
    p, got_b, got_c = mcnemar_exact_p(first, second)
    assert (got_b, got_c) == (b, c)
    expected = 1.0 if b + c == 0 else scipy_stats.binomtest(b, b + c, 0.5).pvalue
    assert p == pytest.approx(expected, rel=1e-12)


def test_mcnemar_refuses_unpaired():
    with pytest.raises(ValueError, match="differ in length"):
        mcnemar_exact_p([True], [True, False])


def test_bootstrap_observed_difference_and_identical_runs():
    first = [[3.0, 2], [5.0, 4], [1.0, 1]]
    second = [[2.0, 2], [4.0, 4], [2.0, 1]]
    diff, low, high = paired_bootstrap_diff(first, second, resamples=200)
    assert diff == pytest.approx(9.0 / 7 - 8.0 / 7, rel=1e-12)
    assert low <= diff <= high
    assert paired_bootstrap_diff(first, first, resamples=50) == (0.0, 0.0, 0.0)


def test_bootstrap_interval_matches_exhaustive_distribution():
    """Two samples: a resample is (i, j) with i, j uniform, 4 equally likely cases; the
    bootstrap's percentiles must sit at that distribution's quantiles."""
    first = [[2.0, 1], [0.0, 1]]
    second = [[0.0, 1], [0.0, 1]]  # differences per sample: 2 and 0
    outcomes = sorted(((first[i][0] + first[j][0]) - (second[i][0] + second[j][0])) / 2
                      for i, j in itertools.product(range(2), repeat=2))  # 0, 1, 1, 2
    # level 0.3: the 35% and 65% quantiles, both inside the mass 1/2 at 1 (P(0) = P(2) = 1/4)
    _, low, high = paired_bootstrap_diff(first, second, resamples=4000, level=0.3)
    assert (low, high) == (outcomes[1], outcomes[2])
    _, low, high = paired_bootstrap_diff(first, second, resamples=4000, level=0.95)
    assert (low, high) == (outcomes[0], outcomes[-1])


def test_bootstrap_refuses_unpaired_samples():
    with pytest.raises(ValueError, match="token count"):
        paired_bootstrap_diff([[1.0, 2]], [[1.0, 3]])


def test_energy_ratio_against_eigenbasis():
    torch.manual_seed(0)
    d, r = 12, 3
    basis, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))
    energies = torch.linspace(0.1, 5.0, d, dtype=torch.float64)
    z = basis @ torch.diag(energies) @ basis.T
    mean_energy = float(energies.mean())
    # rows along eigenvectors: ratio = mean of their eigenvalues / mean eigenvalue, whatever the row scale
    rows = basis[:, :r].T * torch.tensor([[2.0], [2.0], [2.0]], dtype=torch.float64)
    assert study_inits.energy_ratio(rows, z) == pytest.approx(float(energies[:r].mean()) / mean_energy, rel=1e-12)
    # unequal row norms weight by the squared norm
    weighted = basis[:, [0, d - 1]].T * torch.tensor([[1.0], [3.0]], dtype=torch.float64)
    expected = (1 * float(energies[0]) + 9 * float(energies[-1])) / 10 / mean_energy
    assert study_inits.energy_ratio(weighted.float(), z.float()) == pytest.approx(expected, rel=1e-5)  # float32 inputs
    # isotropic Z: every direction is average
    assert study_inits.energy_ratio(torch.randn(r, d), torch.eye(d) * 7) == pytest.approx(1.0, rel=1e-6)
    assert math.isfinite(study_inits.energy_ratio(torch.randn(r, d), z))


def _put(folder, arm, lr, seed, loss, diverged=False):
    import json

    with open(folder / f"{arm}_lr{lr:g}_s{seed}.json", "w") as handle:
        json.dump({"arm": arm, "lr": lr, "seed": seed, "pick_loss": loss, "diverged": diverged}, handle)


def test_driver_plan_resumes_extends_edges_and_picks_best_lr(tmp_path):
    """The driver's plan from fake run JSONs: done runs are not missing, an arm whose best
    pick loss is at the grid's top gets the next LR up, a diverged run is never best, and the
    extra seeds go to the best LR of lora, lora-da and the best variant once those are final."""
    from types import SimpleNamespace

    import study_driver

    args = SimpleNamespace(out=str(tmp_path), arms="lora-da,lora,lora-da-lobpcg10,lora-da-zrel1e-4,lora-da-zrel1e-2",
                           first_lr=2e-4, lrs="1e-4,2e-4,5e-4", max_extend=1, extra_seeds_for="lora,lora-da",
                           extra_seeds="1")
    runs, _ = study_driver.plan(args)
    assert runs[:2] == [("lora-da", 2e-4, 0), ("lora", 2e-4, 0)]  # priority: 2e-4 first
    assert len(runs) == 15
    for arm in args.arms.split(","):
        _put(tmp_path, arm, 1e-4, 0, 1.0)
        _put(tmp_path, arm, 2e-4, 0, 0.9)
        _put(tmp_path, arm, 5e-4, 0, 0.8 if arm != "lora-da-zrel1e-2" else 0.95)
    _put(tmp_path, "lora", 1e-3, 0, float("nan"), diverged=True)
    runs, notes = study_driver.plan(args)
    missing = [r for r in runs if study_driver.read_result(str(tmp_path), r) is None]
    assert ("lora", 5e-4, 1) in missing  # lora's extension diverged: 5e-4 stays best, its seed 1 is planned
    assert ("lora-da", 1e-3, 0) in missing and ("lora-da-zrel1e-2", 1e-3, 0) not in missing
    assert any("best LoRA-DA variant not yet known" in n for n in notes)
    _put(tmp_path, "lora-da", 1e-3, 0, 0.7)
    _put(tmp_path, "lora-da-lobpcg10", 1e-3, 0, 0.85)
    _put(tmp_path, "lora-da-zrel1e-4", 1e-3, 0, 0.75)
    runs, notes = study_driver.plan(args)
    missing = [r for r in runs if study_driver.read_result(str(tmp_path), r) is None]
    assert sorted(missing) == sorted([("lora", 5e-4, 1), ("lora-da", 1e-3, 1), ("lora-da-zrel1e-4", 1e-3, 1)])
    assert not notes


def test_init_angles_recover_a_planted_rotation(tmp_path):
    """study_init_angles: a layer whose lora_A is turned by θ in one plane reads θ; the others 0."""
    import study_init_angles
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(0)
    rows, turned = {}, {}
    for layer, theta in enumerate((0.0, 7.0, 31.0)):
        basis, _ = torch.linalg.qr(torch.randn(40, 5, generator=generator, dtype=torch.float64))
        a = (basis[:, :4] * torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)).T  # r x d_in, not orthonormal
        rad = math.radians(theta)
        b = a.clone()
        b[0] = math.cos(rad) * basis[:, 0] + math.sin(rad) * basis[:, 4]  # first row turned out of the span
        name = f"base_model.model.model.layers.{layer}.self_attn.q_proj"
        rows[name + ".lora_A.weight"], turned[name + ".lora_A.weight"] = a.float(), b.float()
    for arm, tensors in (("lora-da", rows), ("lora-da-lobpcg10", turned)):
        folder = tmp_path / "cache" / f"{arm}_r4_key"
        folder.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "adapter_model.safetensors"))
    study_init_angles.main(["--out", str(tmp_path)])
    result = __import__("json").loads((tmp_path / "init_angles.json").read_text())
    q = result["arms"]["lora-da-lobpcg10"]["q_proj"]
    assert q["n"] == 3
    assert q["max"] == pytest.approx(31.0, abs=1e-3)  # float32 storage: ~1e-4 degrees
    assert q["median"] == pytest.approx(7.0, abs=1e-3)
    assert set(result["arms"]) == {"lora-da-lobpcg10"}
