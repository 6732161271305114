"""Which modules are targets (lora_da/targets.py): not a tied output head; on a model already
wrapped by PEFT, its LoRA layers (through their base layers)."""

import pytest
import torch

import lora_da
from lora_da.models import batches, synthetic_samples, tiny_llama

from helpers import assert_same_fingerprint, model_fingerprint

pytestmark = pytest.mark.filterwarnings("ignore:train_size not given")


def test_tied_output_head_is_not_a_target():
    model = tiny_llama()
    model.config.tie_word_embeddings = True
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    init = lora_da.initialize(model, list(batches(synthetic_samples(4), 2)), rank=2, progress=False)
    assert "lm_head" not in init.modules and len(init.modules) == 14


def test_model_already_wrapped_by_peft():
    from peft import LoraConfig, get_peft_model

    data = list(batches(synthetic_samples(6, seed=12), 3))
    plain = lora_da.initialize(tiny_llama(), data, rank=4, target_modules=["q_proj", "v_proj"], progress=False)
    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    before = model_fingerprint(peft_model)
    wrapped = lora_da.initialize(peft_model, data, rank=4, progress=False)
    assert_same_fingerprint(before, model_fingerprint(peft_model))
    assert set(wrapped.modules) == set(plain.modules)  # LoRA layers only, PEFT prefix dropped
    for name, m in plain.modules.items():
        torch.testing.assert_close(wrapped.modules[name].lora_A, m.lora_A, rtol=1e-5, atol=1e-6)
    wrapped.apply(peft_model)
    layer = peft_model.get_submodule("base_model.model." + "model.layers.0.self_attn.q_proj")
    assert torch.equal(layer.lora_A["default"].weight, wrapped.modules["model.layers.0.self_attn.q_proj"].lora_A)
