"""Every fused-experts family of transformers 5.x that lora-da serves, on tiny random configs:
the captured per-expert forward reproduces the module's own (checked inside the pass), default
targets cover the experts and name the router, and GPT-OSS's transposed, biased experts make the
PEFT round trip."""

import copy

import pytest
import torch

import lora_da
from lora_da.models import batches, synthetic_samples
from lora_da.peft_glue import get_peft_model_with_init
from lora_da.statistics_pass import collect_statistics
from lora_da.targets import find_target_modules
from lora_da.user_warnings import TargetsWarning

pytestmark = pytest.mark.filterwarnings("ignore:train_size not given", "ignore::lora_da.user_warnings.TargetsWarning")

FAMILIES = {
    "qwen2_moe": ("Qwen2Moe", dict(num_key_value_heads=1, intermediate_size=24, moe_intermediate_size=8,
                                   shared_expert_intermediate_size=8, num_experts=4, num_experts_per_tok=2)),
    "olmoe": ("Olmoe", dict(num_key_value_heads=1, intermediate_size=8, num_experts=4, num_experts_per_tok=2)),
    "deepseek_v3": ("DeepseekV3", dict(num_key_value_heads=2, intermediate_size=24, moe_intermediate_size=8,
                                       n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
                                       first_k_dense_replace=0, n_group=1, topk_group=1, kv_lora_rank=8,
                                       q_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8)),
    "gpt_oss": ("GptOss", dict(num_key_value_heads=1, intermediate_size=8, num_local_experts=4, num_experts_per_tok=2,
                               head_dim=8, layer_types=["sliding_attention", "full_attention"], sliding_window=8)),
    "granitemoe": ("GraniteMoe", dict(num_key_value_heads=1, intermediate_size=8, num_local_experts=4,
                                      num_experts_per_tok=2)),
}
ROUTERS = {"qwen2_moe": "mlp.gate", "olmoe": "mlp.gate", "deepseek_v3": "mlp.gate", "gpt_oss": "mlp.router",
           "granitemoe": "block_sparse_moe.router"}


def tiny_family(family, dtype=torch.float32):
    import transformers

    prefix, extra = FAMILIES[family]
    config = getattr(transformers, f"{prefix}Config")(
        vocab_size=128, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64,
        pad_token_id=0, eos_token_id=2, bos_token_id=1, **extra,
    )
    config._experts_implementation = "eager"
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        model = getattr(transformers, f"{prefix}ForCausalLM")(config).to(dtype)
    finally:
        torch.random.set_rng_state(state)
    return model.eval()


def data():
    return list(batches(synthetic_samples(4, seed=5), 2))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_experts_are_default_targets_and_captured_faithfully(family):
    model = tiny_family(family)
    with pytest.warns(TargetsWarning) as record:
        targets = find_target_modules(model, None, rank=2)
    message = str(record[0].message)
    assert len(record) == 1 and f"routers: 'model.layers.*.{ROUTERS[family]}' (2)" in message
    experts = [n for n in targets if ".experts." in n and not n.split(".experts.")[1].startswith("shared")]
    assert len(experts) == 2 * 2 * 4
    stats = collect_statistics(model, data(), targets)  # raises if the capture differs from the module's forward
    routed = [n for n in experts if n in stats.modules]
    assert routed and all(0 < stats.tokens(n) < stats.num_tokens for n in routed)


def test_qwen2_moe_shared_expert_gate_is_left_out_with_the_router():
    with pytest.warns(TargetsWarning, match=r"smaller than rank 2: 'model\.layers\.\*\.mlp\.shared_expert_gate' \(2\)"):
        targets = find_target_modules(tiny_family("qwen2_moe"), None, rank=2)
    assert "model.layers.0.mlp.shared_expert.gate_proj" in targets  # the shared expert is an ordinary MLP


def test_gpt_oss_transposed_experts_round_trip(tmp_path):
    from peft import PeftModel

    base = tiny_family("gpt_oss")
    batch = data()[0]
    init = lora_da.initialize(base, data(), rank=2, target_modules=["experts"], progress=False)
    applied = get_peft_model_with_init(copy.deepcopy(base), init, lora_alpha=4)
    init.save_pretrained(tmp_path, lora_alpha=4)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    with torch.no_grad():
        out = applied(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits
        torch.testing.assert_close(loaded(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits, out, rtol=0, atol=1e-6)
    # pissa reads W_e = gate_up_proj[e]ᵀ (stored d_in x d_out): the offset keeps the output
    pissa = lora_da.initialize(base, None, rank=2, method="pissa", target_modules=["experts"], progress=False)
    offset = get_peft_model_with_init(copy.deepcopy(base), pissa, lora_alpha=4)
    with torch.no_grad():
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
        torch.testing.assert_close(offset(**inputs).logits, base(**inputs).logits, rtol=0, atol=2e-5)
    w = base.model.layers[0].mlp.experts.down_proj[1].detach().double().T  # d_out x d_in
    m = pissa.modules["model.layers.0.mlp.experts.1.down_proj"]
    torch.testing.assert_close((m.lora_B @ m.lora_A).double(), torch.linalg.svd(w).U[:, :2] @ torch.diag(
        torch.linalg.svd(w).S[:2]) @ torch.linalg.svd(w).Vh[:2], rtol=0, atol=1e-5)
