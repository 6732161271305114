"""The memory budget (``max_memory``): pass planning, multi-pass = one pass, errors.

Multi-pass results are compared with the one-pass result on an fp64 model: each
pass accumulates the same sums for its modules in the same order, so factors
agree to rounding (1e-10 relative on σ, 1e-7 on the fp32 factors).
"""

import pytest
import torch

import lora_da
from lora_da.memory import module_statistics_bytes, plan_passes
from lora_da.naming import layer_prefix as layer_of
from lora_da.models import batches, synthetic_samples, tiny_llama
from lora_da.targets import find_target_modules

from helpers import assert_same_fingerprint, model_fingerprint

pytestmark = pytest.mark.filterwarnings("ignore:train_size not given")


def _exact_statistics_bytes(init: lora_da.LoraInit, element_size: int) -> int:
    """Σ over input groups of d_in² plus Σ over modules of d_out·d_in + d_out (independent of the code's sizes)."""
    total = 0
    for group in init.input_groups:
        d_in = init.modules[group[0]].lora_A.shape[1]
        total += d_in * d_in
    for module in init.modules.values():
        d_out, d_in = module.lora_B.shape[0], module.lora_A.shape[1]
        total += d_out * d_in + d_out
    return total * element_size


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


def test_multi_pass_equals_one_pass_and_reports_memory():
    model = tiny_llama(num_layers=3, dtype=torch.float64)
    loader = list(batches(synthetic_samples(8, seed=4), 4))
    before = model_fingerprint(model)
    one = lora_da.initialize(model, loader, rank=2, progress=False)
    layer_budget = sum(
        module_statistics_bytes(m, 8)
        for name, m in find_target_modules(model, None, 2).items()
        if layer_of(name) == "model.layers.0"
    )
    split = lora_da.initialize(model, loader, rank=2, progress=False, max_memory=layer_budget)
    assert_same_fingerprint(before, model_fingerprint(model))

    assert one.passes == 1 and split.passes == 3
    assert one.statistics_bytes == _exact_statistics_bytes(one, 8)
    assert split.statistics_bytes == _exact_statistics_bytes(one, 8) // 3  # equal layers
    assert split.statistics_bytes <= layer_budget
    assert split.num_tokens == one.num_tokens and split.num_samples == one.num_samples
    assert list(split.modules) == list(one.modules)
    for name, m in one.modules.items():
        other = split.modules[name]
        assert abs(other.sigma - m.sigma) <= 1e-10 * m.sigma, name
        torch.testing.assert_close(other.lora_A, m.lora_A, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(other.lora_B, m.lora_B, rtol=1e-6, atol=1e-7)
        assert other.input_group == m.input_group
    for phase in ("forward_backward", "statistics_accumulate", "factor_prep", "solve"):
        assert split.timings[phase] > 0, phase


def test_fraction_of_free_memory_and_bad_budgets():
    model = tiny_llama()
    loader = list(batches(synthetic_samples(4), 2))
    assert lora_da.initialize(model, loader, rank=2, progress=False, max_memory=0.5).passes == 1
    for bad in (0, -5, 0.0, 1.5, "1GB", True):
        with pytest.raises(ValueError, match="max_memory"):
            lora_da.initialize(model, loader, rank=2, progress=False, max_memory=bad)


def test_one_shot_loader_refused_when_several_passes_are_needed():
    model = tiny_llama(num_layers=2)
    before = model_fingerprint(model)
    one_shot = iter(list(batches(synthetic_samples(4), 2)))
    largest_module = max(module_statistics_bytes(m, 4) for m in find_target_modules(model, None, 2).values())
    with pytest.raises(ValueError, match="one-shot iterator.*max_memory|max_memory.*one-shot iterator"):
        lora_da.initialize(model, one_shot, rank=2, progress=False, max_memory=largest_module)
    assert_same_fingerprint(before, model_fingerprint(model))
    # one pass: a generator is fine
    init = lora_da.initialize(model, (b for b in batches(synthetic_samples(4), 2)), rank=2, progress=False)
    assert init.passes == 1


def test_multi_pass_checkpoints_read_back(tmp_path):
    model = tiny_llama(num_layers=2, dtype=torch.float64)
    loader = list(batches(synthetic_samples(6, seed=5), 3))
    path = str(tmp_path / "stats.pt")
    budget = max(module_statistics_bytes(m, 8) for m in find_target_modules(model, None, 2).values())
    first = lora_da.initialize(model, loader, rank=2, progress=False, max_memory=budget, stats_checkpoint=path)
    assert first.passes >= 2
    saved = sorted(p.name for p in tmp_path.iterdir())
    assert saved == [f"stats.pt.pass{i}" for i in range(first.passes)]
    again = lora_da.initialize(model, loader, rank=2, progress=False, max_memory=budget, stats_checkpoint=path)
    for name, m in first.modules.items():
        assert torch.equal(m.lora_A, again.modules[name].lora_A), name
