"""The memory budget (lora_da/memory.py): pass planning, the budget's units and errors and
the solve's share of it; ``init.memory`` (lora_da/memory_peaks.py) and where it is printed
(the passes end to end, multi-pass = one pass: test_pipeline.py)."""

import json
import re

import pytest
import torch

import lora_da
import lora_da.losses
from lora_da import pipeline
from lora_da.methods import lora_da as lora_da_method
from lora_da.memory import (
    module_solve_bytes,
    module_statistics_bytes,
    plan_passes,
    solve_budget,
    solve_reserve,
    statistics_share,
)
from lora_da.naming import layer_prefix as layer_of
from lora_da.models import batches, synthetic_samples, tiny_llama
from lora_da.targets import find_target_modules

pytestmark = pytest.mark.filterwarnings("ignore:train_size not given")


def test_plan_keeps_layers_together_and_splits_when_needed():
    model = tiny_llama(num_layers=3)
    modules = find_target_modules(model, None, 2)
    per_layer = {}
    for name, module in modules.items():
        per_layer[layer_of(name)] = per_layer.get(layer_of(name), 0) + module_statistics_bytes(module, 4)
    assert list(per_layer) == ["model.layers.0", "model.layers.1", "model.layers.2"]
    layer_bytes = per_layer["model.layers.0"]

    assert plan_passes(modules, 10 * layer_bytes, 4) == [modules]
    two_layers = plan_passes(modules, 2 * layer_bytes, 4)
    assert [sorted({layer_of(n) for n in p}) for p in two_layers] == [
        ["model.layers.0", "model.layers.1"],
        ["model.layers.2"],
    ]
    # smaller than a layer: modules of one layer spread over passes, order and coverage kept
    small = plan_passes(modules, layer_bytes // 2, 4)
    assert len(small) > 3
    assert [n for p in small for n in p] == list(modules)
    for p in small:
        assert sum(module_statistics_bytes(m, 4) for m in p.values()) <= layer_bytes // 2
    with pytest.raises(MemoryError, match=r"module 'model\.layers\.0\.self_attn\.q_proj' need .* 16 bytes; raise max_memory"):
        plan_passes(modules, 16, 4)


def test_fraction_of_free_memory_and_bad_budgets():
    model = tiny_llama()
    loader = list(batches(synthetic_samples(4), 2))
    assert lora_da.initialize(model, loader, rank=2, progress=False, max_memory=0.5).passes == 1
    for bad in (0, -5, 0.0, 1.5, "1GB", True):
        with pytest.raises(ValueError, match="max_memory"):
            lora_da.initialize(model, loader, rank=2, progress=False, max_memory=bad)


# -- max_memory bounds the statistics and the solve's share -----------------------------


def test_statistics_share_keeps_the_solve_reserve_back():
    modules = find_target_modules(tiny_llama(), None, 2)
    reserve = solve_reserve(modules)
    largest = max(modules, key=lambda n: module_solve_bytes(modules[n]))
    d_in, d_out = modules[largest].in_features, modules[largest].out_features
    assert reserve == 8 * (3 * d_in * d_in + 2 * d_out * d_in)  # float64: Z, two Cholesky factors, Δ̂, Gᵀ
    assert statistics_share(reserve + 1000, modules) == 1000
    with pytest.raises(MemoryError, match=rf"solve of module '{re.escape(largest)}' needs .*; raise max_memory"):
        statistics_share(reserve, modules)
    # given: everything the statistics leave; default: at most the statistics' own bytes (or the reserve)
    assert solve_budget(10_000, 3_000, 500, given=True) == 7_000
    assert solve_budget(10_000, 3_000, 500, given=False) == 3_000
    assert solve_budget(10_000, 100, 500, given=False) == 500
    assert solve_budget(1_000, 900, 500, given=True) == 500  # never below the reserve the plan kept


def _solve_budgets(monkeypatch, **kwargs):
    """``(statistics bytes, solve_memory_budget)`` of every pass of one initialize call."""
    seen = []
    real = pipeline.solve_pass

    def spy(method, context, model, config):
        seen.append((context.statistics.nbytes(), context.solve_memory_budget))
        return real(method, context, model, config)

    monkeypatch.setattr(pipeline, "solve_pass", spy)
    init = lora_da.initialize(tiny_llama(num_layers=3), list(batches(synthetic_samples(6), 3)), rank=2,
                              progress=False, **kwargs)
    return init, seen


def test_max_memory_bounds_statistics_plus_the_solve_budget(monkeypatch):
    targets = find_target_modules(tiny_llama(num_layers=3), None, 2)
    budget = solve_reserve(targets) + 60_000  # a layer's statistics do not fit: several passes
    init, seen = _solve_budgets(monkeypatch, max_memory=budget)
    assert init.passes == len(seen) > 1
    for statistics, solve in seen:
        assert solve == budget - statistics >= solve_reserve(targets)
    _, [(statistics, solve)] = _solve_budgets(monkeypatch)  # default: half the free memory
    assert solve == max(statistics, solve_reserve(targets))


# -- init.memory: the peak of each phase -------------------------------------------------


def _check_memory(memory):
    assert memory.measure == "rss"
    phases = (memory.statistics_pass, memory.factor_prep, memory.solve)
    assert memory.start > 0 and memory.total >= max(memory.start, *phases)
    assert memory.as_dict() == {"measure": "rss", "start": memory.start, "statistics_pass": phases[0],
                                "factor_prep": phases[1], "solve": phases[2], "total": memory.total}
    return phases


def test_init_memory_reports_each_phase():
    init = lora_da.initialize(tiny_llama(), list(batches(synthetic_samples(6), 3)), rank=2, progress=False)
    assert all(value > 0 for value in _check_memory(init.memory))
    assert init.report()["memory_bytes"] == init.memory.as_dict()
    line = init.summary().splitlines()[-1]
    assert line.startswith("memory (peak rss): start ") and "statistics_pass" in line and "total" in line
    no_data = lora_da.initialize(tiny_llama(), None, rank=2, method="lora", progress=False)
    statistics_pass, _, solve = _check_memory(no_data.memory)
    assert statistics_pass == 0 and solve > 0  # no statistics pass ran


HELD_MIB = 96


def _transient(mib: int) -> None:
    block = torch.ones(mib * 2**20 // 4)  # touched: resident, then freed
    del block


def test_init_memory_sees_each_phase_peak(monkeypatch):
    """Planted transient allocations, freed before their phase ends: 96 MiB in the statistics
    pass (by the loss), 2 x 96 MiB in LoRA-DA's preparation, 3 x 96 MiB in its solve. Each
    phase's peak must show its own over the call's start, though none is held at the phase's end."""
    def loss_with_a_transient(model, batch):
        _transient(HELD_MIB)
        return lora_da.losses.causal_lm_per_sample_loss(model, batch)

    real_prepare, real_lobpcg = lora_da_method.batched.prepare_modules, lora_da_method.lobpcg

    def prepare_with_a_transient(*args, **kwargs):
        _transient(2 * HELD_MIB)
        return real_prepare(*args, **kwargs)

    def lobpcg_with_a_transient(*args, **kwargs):
        _transient(3 * HELD_MIB)
        return real_lobpcg(*args, **kwargs)

    monkeypatch.setattr(lora_da_method.batched, "prepare_modules", prepare_with_a_transient)
    monkeypatch.setattr(lora_da_method, "lobpcg", lobpcg_with_a_transient)
    init = lora_da.initialize(tiny_llama(), list(batches(synthetic_samples(6), 3)), rank=2, progress=False,
                              loss_fn=loss_with_a_transient)
    memory = init.memory
    _check_memory(memory)
    mib = 2**20
    assert memory.statistics_pass - memory.start >= 0.9 * HELD_MIB * mib
    assert memory.factor_prep - memory.start >= 1.8 * HELD_MIB * mib
    assert memory.solve - memory.start >= 2.7 * HELD_MIB * mib
    assert memory.total == max(memory.statistics_pass, memory.factor_prep, memory.solve)


@pytest.mark.cuda
def test_init_memory_on_cuda_counts_the_allocator_bytes():
    """On CUDA the phases are the allocator's bytes on the model's device: the statistics
    (there, on the GPU) raise the statistics pass's peak above the start."""
    model = tiny_llama(hidden_size=256, intermediate_size=512).cuda()
    init = lora_da.initialize(model, list(batches(synthetic_samples(6), 3)), rank=2, progress=False)
    memory = init.memory
    assert memory.measure == "cuda_allocated"
    assert memory.start >= sum(p.numel() * p.element_size() for p in model.parameters())
    assert memory.statistics_pass - memory.start >= init.statistics_bytes
    assert memory.total >= max(memory.statistics_pass, memory.factor_prep, memory.solve) > 0


def test_cli_init_and_bench_print_the_memory(model_dir, data_file, tmp_path, capsys):
    from cli_helpers import RANK, init_args
    from lora_da import cli

    assert cli.main(init_args(model_dir, data_file, tmp_path / "adapter")) == 0
    assert "memory (peak rss): start " in capsys.readouterr().out
    report = json.loads((tmp_path / "adapter" / "lora_da_report.json").read_text())
    assert set(report["memory_bytes"]) == {"measure", "start", "statistics_pass", "factor_prep", "solve", "total"}
    assert cli.main(["bench", "--model", model_dir, "--data", data_file, "--rank", str(RANK), "--samples", "8",
                     "--quiet", "--json", str(tmp_path / "bench.json")]) == 0
    assert "memory (peak rss): start " in capsys.readouterr().out
    assert json.loads((tmp_path / "bench.json").read_text())["memory_bytes"]["total"] > 0


@pytest.mark.slow
def test_two_layer_init_growth_is_bounded_by_its_statistics():
    """Issue 17's rule, in a fresh process (bench/memory_rss.py's child, about a minute):
    on a 2-layer Llama (hidden 1024, intermediate 4096, 4 batches x 2 x 64 tokens)
    initialize()'s peak-RSS growth over the loaded model stays within 2.5 x statistics_bytes
    + 200 MiB. Holding a float64 copy of every module's G and Z at once (about 4 x the
    statistics) breaks it."""
    import os
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(__file__), os.pardir, "bench", "memory_rss.py")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    done = subprocess.run([sys.executable, script, "--case", "two-layer", "--child", "init"],
                          capture_output=True, text=True, env=env, check=True, timeout=900)
    numbers = json.loads(done.stdout.strip().splitlines()[-1])
    growth = numbers["peak_rss"] - numbers["rss_after_load"]
    assert growth <= 2.5 * numbers["statistics_bytes"] + 200 * 2**20, numbers
