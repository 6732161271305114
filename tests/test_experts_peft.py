"""Expert LoRAs through PEFT 0.21's target_parameters (lora_da/expert_peft.py): apply, save,
vanilla PeftModel.from_pretrained, and the base-weight offset of methods that change W."""

import copy

import pytest
import torch

import lora_da
from lora_da.peft_glue import get_peft_model_with_init, load_init_adapter

from test_experts import data, tiny_moe

pytestmark = pytest.mark.filterwarnings("ignore:train_size not given", "ignore::lora_da.user_warnings.TargetsWarning")


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_experts_round_trip_through_vanilla_from_pretrained(family, tmp_path):
    from peft import PeftModel

    base = tiny_moe(family, dtype=torch.float32)
    loader = data()
    init = lora_da.initialize(base, loader, rank=2, progress=False)
    assert len(init.experts) == 16 and len(init.modules) > 16  # experts and the attention linears
    applied = get_peft_model_with_init(copy.deepcopy(base), init, lora_alpha=4)
    init.save_pretrained(tmp_path, lora_alpha=4)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    batch = loader[0]
    out = logits(applied, batch)
    # the same float32 factors in the same PEFT code: equal up to the order of float32 sums
    torch.testing.assert_close(logits(loaded, batch), out, rtol=0, atol=1e-6)
    assert (out - logits(base, batch)).abs().max() > 1e-4  # the experts' LoRA changes the output
    # the packing, against PEFT's own ΔW of each expert: s·B_e·A_e
    layer = applied.get_submodule("base_model.model.model.layers.1.mlp.experts")
    assert layer.parameter_name == "down_proj"
    delta = layer.get_delta_weight("default")
    for e in range(4):
        m = init.modules[f"model.layers.1.mlp.experts.{e}.down_proj"]
        torch.testing.assert_close(delta[e], layer.scaling["default"] * (m.lora_B @ m.lora_A), rtol=1e-5, atol=1e-7)


def test_pissa_on_experts_offsets_each_expert_and_keeps_the_output(tmp_path):
    base = tiny_moe("qwen3_moe", dtype=torch.float32)
    init = lora_da.initialize(base, None, rank=2, method="pissa", target_modules=["experts"], progress=False)
    assert not init.expert_fallbacks  # no data: every expert served
    batch = data()[0]
    applied = get_peft_model_with_init(copy.deepcopy(base), init, lora_alpha=4)
    # W_e − s·B_e·A_e + s·B_e·A_e: the output at init is the base model's (float32 rounding)
    torch.testing.assert_close(logits(applied, batch), logits(base, batch), rtol=0, atol=2e-5)
    w = base.model.layers[0].mlp.experts.gate_up_proj[2].detach().double()
    u, s, vh = torch.linalg.svd(w)
    offset = applied.base_model.model.model.layers[0].mlp.experts.base_layer.get_param()[2].detach().double()
    torch.testing.assert_close(offset, w - (u[:, :2] * s[:2]) @ vh[:2], rtol=0, atol=1e-5)  # PiSSA: residual of the top 2
    init.save_pretrained(tmp_path, lora_alpha=4)
    loaded = load_init_adapter(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(logits(loaded, batch), logits(applied, batch), rtol=0, atol=1e-6)


def test_apply_without_target_parameters_names_the_experts():
    from peft import LoraConfig, get_peft_model

    base = tiny_moe("qwen3_moe", dtype=torch.float32)
    init = lora_da.initialize(base, None, rank=2, method="lora", progress=False)
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"experts 'model\.layers\.0\.mlp\.experts\.gate_up_proj' of this LoraInit have no"):
        init.apply(peft_model)
