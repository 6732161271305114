"""The memory budget (lora_da/memory.py): pass planning and the budget's units and errors
(the passes end to end, multi-pass = one pass: test_pipeline.py)."""

import pytest

import lora_da
from lora_da.memory import module_statistics_bytes, plan_passes
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
