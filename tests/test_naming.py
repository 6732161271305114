"""Module names (lora_da/naming.py): the layer a module sits in, its index, type and kind, on the
naming schemes of Llama, GPT-2, T5, nn.Sequential and names without an index."""

import pytest
from torch import nn

from lora_da.models import tiny_llama
from lora_da.naming import layer_index, layer_prefix, module_kind, module_type
from lora_da.targets import find_target_modules

from helpers import SharedInputMLP, tiny_gpt2

T5_WI = "encoder.block.11.layer.0.DenseReluDense.wi"
T5_REAL_WI = "encoder.block.11.layer.1.DenseReluDense.wi"  # in transformers' T5 the encoder's FF is layer 1

CASES = [
    # name, layer_prefix, layer_index, module_type, module_kind
    ("model.layers.3.self_attn.q_proj", "model.layers.3", 3, "q_proj", "model.layers.*.self_attn.q_proj"),
    ("model.layers.0.mlp.down_proj", "model.layers.0", 0, "down_proj", "model.layers.*.mlp.down_proj"),
    ("transformer.h.0.attn.c_attn", "transformer.h.0", 0, "c_attn", "transformer.h.*.attn.c_attn"),
    ("transformer.h.10.mlp.c_fc", "transformer.h.10", 10, "c_fc", "transformer.h.*.mlp.c_fc"),
    # T5: the first index is the block; every index is starred in the kind
    (T5_WI, "encoder.block.11", 11, "wi", "encoder.block.*.layer.*.DenseReluDense.wi"),
    (T5_REAL_WI, "encoder.block.11", 11, "wi", "encoder.block.*.layer.*.DenseReluDense.wi"),
    ("decoder.block.2.layer.1.EncDecAttention.q", "decoder.block.2", 2, "q", "decoder.block.*.layer.*.EncDecAttention.q"),
    # nn.Sequential: the index comes first
    ("0.fc", "0", 0, "fc", "*.fc"),
    ("12.0.fc", "12", 12, "fc", "*.*.fc"),
    # an index as the last component
    ("blocks.7", "blocks.7", 7, "7", "blocks.*"),
    # no index: the name is its own layer; digits inside a component are no index
    ("fc1a", "fc1a", -1, "fc1a", "fc1a"),
    ("lm_head", "lm_head", -1, "lm_head", "lm_head"),
    ("model.layer1.fc2", "model.layer1.fc2", -1, "fc2", "model.layer1.fc2"),
    ("encoder.h0.attn", "encoder.h0.attn", -1, "attn", "encoder.h0.attn"),
    ("model.2a.proj", "model.2a.proj", -1, "proj", "model.2a.proj"),
]


@pytest.mark.parametrize("name,prefix,index,kind_of_module,kind", CASES, ids=[c[0] for c in CASES])
def test_names(name, prefix, index, kind_of_module, kind):
    assert layer_prefix(name) == prefix
    assert layer_index(name) == index
    assert module_type(name) == kind_of_module
    assert module_kind(name) == kind


def _check_model(model, expected_layers):
    """Every target's layer prefix is a module of the model that contains the target."""
    modules = dict(model.named_modules())
    targets = find_target_modules(model, None, 1)
    layers = {}
    for name in targets:
        prefix = layer_prefix(name)
        assert prefix in modules, name
        assert name == prefix or name.startswith(prefix + "."), name
        assert modules[name] in set(modules[prefix].modules()), name
        layers.setdefault(prefix, layer_index(name))
    assert list(layers) == [p for p, _ in expected_layers]
    assert list(layers.values()) == [i for _, i in expected_layers]
    return targets


def test_real_llama_gpt2_and_sequential_names():
    targets = _check_model(tiny_llama(num_layers=3), [(f"model.layers.{i}", i) for i in range(3)])
    assert {module_kind(n) for n in targets} == {
        f"model.layers.*.{part}"
        for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    }
    targets = _check_model(tiny_gpt2(n_layer=2), [("transformer.h.0", 0), ("transformer.h.1", 1)])
    assert "transformer.h.0.attn.c_attn" in targets
    assert {module_kind(n) for n in targets} == {
        "transformer.h.*.attn.c_attn", "transformer.h.*.attn.c_proj", "transformer.h.*.mlp.c_fc", "transformer.h.*.mlp.c_proj"
    }

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

    _check_model(nn.Sequential(Block(), Block(), nn.ReLU(), Block()), [("0", 0), ("1", 1), ("3", 3)])
    _check_model(SharedInputMLP(), [("fc1a", -1), ("fc1b", -1), ("fc2", -1)])  # index-free: one layer each


def test_real_t5_name():
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=32, d_model=8, d_kv=4, d_ff=16, num_layers=12, num_decoder_layers=1, num_heads=2)
    model = T5ForConditionalGeneration(config)
    assert T5_REAL_WI in dict(model.named_modules())
    targets = find_target_modules(model, ["wi"], 1)
    assert [layer_index(n) for n in targets if n.startswith("encoder.")] == list(range(12))
    assert {module_kind(n) for n in targets} == {
        "encoder.block.*.layer.*.DenseReluDense.wi", "decoder.block.*.layer.*.DenseReluDense.wi"
    }
    assert layer_prefix("decoder.block.0.layer.2.DenseReluDense.wi") == "decoder.block.0"
