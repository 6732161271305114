"""Layer types (lora_da/layers.py): GPT-2 Conv1D (weight stored transposed) and quantized
linears whose weight is not a float tensor."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

import lora_da
from lora_da.models import batches, synthetic_samples
from lora_da.targets import find_target_modules

from helpers import (
    FakeQuantizedLinear,
    SharedInputMLP,
    product,
    regression_batches,
    regression_loss,
    tiny_gpt2,
)

pytestmark = pytest.mark.filterwarnings("ignore:train_size not given")


def test_gpt2_conv1d_supported_with_transposed_weight():
    data = list(batches(synthetic_samples(6, seed=10), 3))
    model = tiny_gpt2()
    names = ["transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.c_proj"]
    stats = lora_da.collect_statistics(model, data, find_target_modules(model, names, rank=2))
    # G (d_out x d_in) against autograd's Conv1D weight gradient (d_in x d_out)
    reference = tiny_gpt2()
    samples = 0
    for b in data:
        logits = reference(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        token_loss = nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, 128), b["labels"][:, 1:].reshape(-1), ignore_index=-100, reduction="none"
        ).view(logits.shape[0], -1)
        (token_loss.sum(1) / (b["labels"][:, 1:] != -100).sum(1)).sum().backward()
        samples += logits.shape[0]
    for name in names:
        expected = reference.get_submodule(name).weight.grad.T / samples
        torch.testing.assert_close(stats.gradient(name), expected, rtol=1e-4, atol=1e-7)

    init = lora_da.initialize(tiny_gpt2(), data, rank=2, progress=False, preserve_output=True)
    assert "transformer.h.0.attn.c_attn" in init.modules and "lm_head" not in init.modules
    assert init.modules["transformer.h.0.attn.c_attn"].lora_B.shape == (96, 2)
    peft_model = get_peft_model(tiny_gpt2(), LoraConfig(r=2, target_modules=list(init.modules), fan_in_fan_out=True))
    init.apply(peft_model)
    with torch.no_grad():
        ids = data[0]["input_ids"]
        torch.testing.assert_close(peft_model(input_ids=ids).logits, tiny_gpt2()(input_ids=ids).logits, rtol=1e-4, atol=1e-5)


def test_conv1d_w_reading_method_uses_the_transposed_weight(data):
    def gpt2():
        return tiny_gpt2(n_layer=1)

    init = lora_da.initialize(gpt2(), None, rank=2, progress=False, method="pissa")
    name = "transformer.h.0.mlp.c_fc"
    W = gpt2().get_submodule(name).weight.detach().double().T  # Conv1D stores Wᵀ
    u, s, vh = torch.linalg.svd(W, full_matrices=False)
    torch.testing.assert_close(product(init.modules[name]), u[:, :2] @ torch.diag(s[:2]) @ vh[:2], rtol=1e-5, atol=1e-6)
    peft_model = get_peft_model(gpt2(), LoraConfig(r=2, target_modules=list(init.modules), fan_in_fan_out=True))
    init.apply(peft_model)
    ids = data[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids).logits, gpt2()(input_ids=ids).logits, rtol=1e-4, atol=1e-5)


def test_quantized_base_modules_are_served_without_reading_the_weight():
    model = SharedInputMLP(dtype=torch.float32)
    for name in ("fc1a", "fc1b", "fc2"):
        setattr(model, name, FakeQuantizedLinear(getattr(model, name)))
    dequantized = SharedInputMLP(dtype=torch.float32)
    with torch.no_grad():
        for name in ("fc1a", "fc1b", "fc2"):
            getattr(dequantized, name).weight.copy_(getattr(model, name).dequantized())
            getattr(dequantized, name).bias.copy_(getattr(model, name).bias)
    data = regression_batches(dtype=torch.float32)
    kwargs = dict(rank=2, loss_fn=regression_loss, train_size=10, progress=False, target_modules=["fc1a", "fc2"])
    quantized_init = lora_da.initialize(model, data, **kwargs)
    assert model.fc1a.weight.dtype == torch.int8 and not model.fc1a.weight.requires_grad
    reference = lora_da.initialize(dequantized, data, **kwargs)
    for name, m in reference.modules.items():
        torch.testing.assert_close(quantized_init.modules[name].lora_A, m.lora_A, rtol=1e-4, atol=1e-5)
