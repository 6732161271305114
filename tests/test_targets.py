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


# -- default targets: output heads, targets smaller than the rank, one warning (issue 17 item 5) --------


def tiny_llama_classifier(num_labels=2):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, num_labels=num_labels,
    )
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        return LlamaForSequenceClassification(config).eval()
    finally:
        torch.random.set_rng_state(state)


def classification_batches(num=8, batch_size=4, seq=7, seed=0):
    generator = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, num, batch_size):
        ids = torch.randint(3, 128, (batch_size, seq), generator=generator)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                    "labels": torch.randint(0, 2, (batch_size,), generator=generator)})
    return out


def classification_loss(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="none")


def test_classifier_head_is_left_out_with_one_warning():
    from lora_da.user_warnings import TargetsWarning

    model = tiny_llama_classifier()
    with pytest.warns(TargetsWarning, match=r"output heads: 'score'") as record:
        init = lora_da.initialize(model, classification_batches(), rank=4, loss_fn=classification_loss, progress=False)
    assert len([w for w in record if issubclass(w.category, TargetsWarning)]) == 1
    assert "score" not in init.modules and len(init.modules) == 14
    with pytest.raises(ValueError, match=r"rank=4 exceeds min\(d_in, d_out\)=2 of module 'score'"):
        lora_da.initialize(model, classification_batches(), rank=4, target_modules=["score"], loss_fn=classification_loss)


def test_everything_under_a_classifier_module_is_left_out():
    from transformers import RobertaConfig, RobertaForSequenceClassification

    from lora_da.targets import find_target_modules
    from lora_da.user_warnings import TargetsWarning

    config = RobertaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=32, max_position_embeddings=40, num_labels=3)
    model = RobertaForSequenceClassification(config)
    with pytest.warns(TargetsWarning, match=r"output heads: 'classifier\.dense', 'classifier\.out_proj'"):
        targets = find_target_modules(model, None, rank=2)
    assert not any(name.startswith("classifier") for name in targets)
    assert "roberta.encoder.layer.0.attention.self.query" in targets


def test_no_warning_when_nothing_is_left_out(recwarn):
    from lora_da.targets import find_target_modules

    find_target_modules(tiny_llama(), None, rank=2)  # the LM head is left out as documented, silently
    assert not [w for w in recwarn if "left out" in str(w.message)]


def test_seq_cls_adapter_round_trips_through_vanilla_from_pretrained(tmp_path):
    import copy
    import json

    from peft import PeftModel

    from lora_da.peft_glue import get_peft_model_with_init

    base = tiny_llama_classifier()
    data = classification_batches()
    with pytest.warns(lora_da.user_warnings.TargetsWarning):
        init = lora_da.initialize(base, data, rank=4, loss_fn=classification_loss, progress=False)
    applied = get_peft_model_with_init(copy.deepcopy(base), init, lora_alpha=8, task_type="SEQ_CLS")
    with pytest.raises(ValueError, match=r"task_type=.SEQ_CLS.: PEFT trains the head .* pass model="):
        init.save_pretrained(tmp_path, lora_alpha=8, task_type="SEQ_CLS")
    init.save_pretrained(tmp_path, lora_alpha=8, task_type="SEQ_CLS", model=base)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert type(loaded).__name__ == "PeftModelForSequenceClassification"
    with torch.no_grad():
        inputs = {k: data[0][k] for k in ("input_ids", "attention_mask")}
        out = applied(**inputs).logits
        torch.testing.assert_close(loaded(**inputs).logits, out, rtol=0, atol=1e-6)
        assert (out - base(**inputs).logits).abs().max() > 1e-5  # the LoRA-DA factors act


def test_methods_that_read_w_refuse_offloaded_weights_by_name():
    from accelerate import cpu_offload

    model = tiny_llama()
    cpu_offload(model, execution_device=torch.device("cpu"))  # every weight on meta, loaded per forward
    assert model.model.layers[0].self_attn.q_proj.weight.is_meta
    pattern = r"module 'model\.layers\.0\.self_attn\.q_proj' has its weight on the meta device"
    for method, loader in (("pissa", None), ("milora", None), ("cntlora", list(batches(synthetic_samples(4), 2)))):
        calls = []
        model.register_forward_pre_hook(lambda *a: calls.append(1))
        with pytest.raises(TypeError, match=pattern):
            lora_da.initialize(model, loader, rank=2, method=method, progress=False)
        assert not calls  # refused before any pass
    # methods that read no weight run on the offloaded model (its hooks load each weight for the forward)
    init = lora_da.initialize(model, list(batches(synthetic_samples(4), 2)), rank=2, progress=False)
    assert len(init.modules) == 14
