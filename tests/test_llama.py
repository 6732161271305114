"""End to end on a tiny random LlamaForCausalLM with padding.

fp64 models are used where results are compared across runs (batch-size
invariance), so that only accumulation order differs: agreement to 1e-8.
"""

import pytest
import torch

import lora_da
from lora_da.models import batches, synthetic_samples, tiny_llama
from lora_da.targets import find_target_modules

from helpers import principal_angle

pytestmark = pytest.mark.filterwarnings("ignore:train_size not given")


def test_batch_size_invariance():
    model = tiny_llama(dtype=torch.float64)
    samples = synthetic_samples(8, seed=1)
    for mask in ("attention", "labels"):
        one = lora_da.initialize(model, list(batches(samples, 1)), rank=4, token_mask=mask, progress=False)
        four = lora_da.initialize(model, list(batches(samples, 4)), rank=4, token_mask=mask, progress=False)
        assert one.num_tokens == four.num_tokens and one.num_samples == four.num_samples == 8
        for name, m in one.modules.items():
            torch.testing.assert_close(m.lora_A, four.modules[name].lora_A, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(m.lora_B, four.modules[name].lora_B, rtol=1e-6, atol=1e-7)
            assert abs(m.sigma - four.modules[name].sigma) <= 1e-8 * m.sigma


def test_left_and_right_padding_agree():
    model = tiny_llama(dtype=torch.float64)
    samples = synthetic_samples(6, seed=2)
    right = lora_da.initialize(model, list(batches(samples, 3, padding_side="right")), rank=2, progress=False)
    left = lora_da.initialize(model, list(batches(samples, 3, padding_side="left")), rank=2, progress=False)
    for name, m in right.modules.items():
        assert principal_angle(m.lora_A.T, left.modules[name].lora_A.T) < 1e-5, name


def test_shared_input_groups_found_from_tensors():
    model = tiny_llama(num_layers=2)
    init = lora_da.initialize(model, list(batches(synthetic_samples(4), 2)), rank=2, progress=False)
    groups = {tuple(sorted(n.rsplit(".", 1)[-1] for n in g)) for g in init.input_groups}
    assert groups == {("k_proj", "q_proj", "v_proj"), ("gate_proj", "up_proj"), ("o_proj",), ("down_proj",)}
    assert len(init.input_groups) == 2 * 4  # per layer: qkv, o, gate/up, down
    assert "lm_head" not in init.modules and len(init.modules) == 14


def test_token_masks_count_the_right_tokens():
    model = tiny_llama()
    samples = synthetic_samples(5, seed=3)
    loader = list(batches(samples, 2))
    attention = lora_da.initialize(model, loader, rank=2, token_mask="attention", progress=False)
    labels = lora_da.initialize(model, loader, rank=2, token_mask="labels", progress=False)
    assert attention.num_tokens == sum(int(b["attention_mask"].sum()) for b in loader)
    assert labels.num_tokens == sum(int((b["labels"][:, 1:] != -100).sum()) for b in loader)
    assert labels.num_tokens < attention.num_tokens


def test_statistics_match_autograd_and_plain_hooks():
    """G against PyTorch's own weight gradients; Z against a plain forward hook."""
    model = tiny_llama(dtype=torch.float64)
    loader = list(batches(synthetic_samples(6, seed=4), 3))
    names = ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj", "model.layers.0.mlp.down_proj"]
    # token_mask="labels": prompt tokens enter G (through attention) but not Z or y
    stats = lora_da.collect_statistics(model, loader, find_target_modules(model, names, rank=1), token_mask="labels")

    # independent G: ordinary backward of the summed per-sample losses into param.grad
    reference = tiny_llama(dtype=torch.float64)
    reference.train(False)
    samples = 0
    for batch in loader:
        logits = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        token_loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1),
            ignore_index=-100, reduction="none",
        ).view(logits.shape[0], -1)
        valid = (batch["labels"][:, 1:] != -100)
        per_sample = token_loss.sum(1) / valid.sum(1)
        per_sample.sum().backward()
        samples += logits.shape[0]
    modules = dict(reference.named_modules())
    for name in names:
        expected = modules[name].weight.grad / samples
        torch.testing.assert_close(stats.gradient(name), expected, rtol=1e-10, atol=1e-14)

    # independent Z: capture the input with a plain hook, sum a aᵀ over tokens with a next-token label
    captured = []
    handle = modules[names[0]].register_forward_hook(lambda m, args, out: captured.append(args[0].detach()))
    with torch.no_grad():
        for batch in loader:
            reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    handle.remove()
    masks = [torch.nn.functional.pad(b["labels"][:, 1:] != -100, (0, 1)).double() for b in loader]
    z = sum(torch.einsum("bsi,bsj,bs->ij", a, a, m) for a, m in zip(captured, masks)) / sum(m.sum() for m in masks)
    torch.testing.assert_close(stats.input_factor(names[1]), z, rtol=1e-10, atol=1e-14)


def test_end_to_end_fp32_result_contents():
    model = tiny_llama()
    samples = synthetic_samples(12, seed=5)
    with pytest.warns(UserWarning, match="train_size not given"):
        init = lora_da.initialize(model, list(batches(samples, 4)), rank=4, progress=False)
    assert init.train_size == init.num_samples == 12
    phases = {"forward_backward", "statistics_accumulate", "factor_prep", "solve", "total"}
    assert set(init.timings) == phases and all(t >= 0 for t in init.timings.values())
    assert sum(init.timings[p] for p in phases - {"total"}) <= init.timings["total"] * (1 + 1e-9)
    assert init.passes == 1 and init.statistics_bytes > 0
    assert init.backends["statistics"] == "torch"
    assert init.backends["solve"].startswith("lobpcg/cpu-openblas")  # tiny shapes: its dense fallback
    for name, m in init.modules.items():
        module = dict(model.named_modules())[name]
        assert m.lora_A.shape == (4, module.in_features) and m.lora_A.dtype == torch.float32
        assert m.lora_B.shape == (module.out_features, 4) and m.lora_B.dtype == torch.float32
        assert torch.all(m.eigenvalues[1:] >= m.eigenvalues[:-1])
        # rows of lora_A are orthonormal up to 1/√γ
        gram = m.lora_A.double() @ m.lora_A.double().T * init.config.gamma
        torch.testing.assert_close(gram, torch.eye(4, dtype=torch.float64), atol=1e-5, rtol=0)
    report = init.report()
    assert report["num_tokens"] == init.num_tokens and len(report["modules"]) == len(init.modules)
