"""Clear errors on bad input, and the model left exactly as found after each."""

import pytest
import torch

import lora_da
from lora_da.models import batches, synthetic_samples, tiny_llama

from helpers import (
    SharedInputMLP,
    assert_same_fingerprint,
    model_fingerprint,
    regression_batches,
    regression_loss,
)

pytestmark = pytest.mark.filterwarnings("ignore:train_size not given")


@pytest.fixture
def llama():
    model = tiny_llama()
    # an unusual starting state that must survive: training mode, some frozen parameters, one hook
    model.train()
    model.model.layers[0].mlp.eval()
    for name, p in model.named_parameters():
        p.requires_grad_("layers.1" in name)
    model.model.norm.register_forward_hook(lambda *args: None)
    return model


def loader():
    return list(batches(synthetic_samples(6, seed=3), 3))


def test_success_leaves_model_as_found(llama):
    before = model_fingerprint(llama)
    lora_da.initialize(llama, loader(), rank=2, progress=False)
    assert_same_fingerprint(before, model_fingerprint(llama))


def no_labels_loader():
    return [{k: v for k, v in b.items() if k != "labels"} for b in loader()]


def all_masked_loader():
    out = loader()
    for b in out:
        b["attention_mask"].zero_()
    return out


def failing_loss(model, batch):
    model(input_ids=batch["input_ids"])
    raise KeyboardInterrupt  # the user's code (or Ctrl-C) interrupts mid-pass


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(rank=17), ValueError, r"rank=17 exceeds min\(d_in, d_out\)=16 of module 'model.layers.0.self_attn.k_proj'"),
        (dict(target_modules=["nonexistent"]), ValueError, "no module of LlamaForCausalLM matched"),
        (dict(target_modules=["model.norm"]), ValueError, "'model.norm' is a LlamaRMSNorm, not an nn.Linear"),
        (dict(loader="empty"), ValueError, "the loader yielded no batches"),
        (dict(loader="no_labels"), ValueError, "default causal-LM loss needs dict-like batches with 'labels'"),
        (dict(loader="all_masked"), ValueError, r"every batch's token mask was empty \(2 batches skipped\)"),
        (dict(loss_fn=failing_loss), KeyboardInterrupt, None),
        (dict(loss_fn=lambda m, b: torch.ones(3)), RuntimeError, "does not depend on any target module"),
        (dict(token_mask="bogus"), ValueError, "token_mask must be one of"),
        (dict(rank=0), ValueError, "rank must be a positive int"),
        (dict(damping=-1.0), ValueError, "damping must be > 0"),
    ],
)
def test_bad_input_raises_clearly_and_restores(llama, kwargs, error, match):
    special = {"no_labels": no_labels_loader, "all_masked": all_masked_loader, "empty": list}
    data = special[kwargs.pop("loader")]() if "loader" in kwargs else loader()
    rank = kwargs.pop("rank", 2)
    before = model_fingerprint(llama)
    with pytest.raises(error, match=match):
        lora_da.initialize(llama, data, rank=rank, progress=False, **kwargs)
    assert_same_fingerprint(before, model_fingerprint(llama))


def test_empty_batch_is_skipped_and_counted():
    model = tiny_llama(dtype=torch.float64)
    data = loader()
    empty = {k: v.clone() for k, v in data[0].items()}
    empty["attention_mask"].zero_()
    with_empty = lora_da.initialize(model, [empty] + data, rank=2, progress=False)
    without = lora_da.initialize(model, data, rank=2, progress=False)
    assert with_empty.skipped_batches == 1 and without.skipped_batches == 0
    assert with_empty.num_batches == len(data) + 1
    for name, m in without.modules.items():
        torch.testing.assert_close(with_empty.modules[name].lora_A, m.lora_A)


def test_nan_statistic_names_the_module():
    model = SharedInputMLP()
    data = regression_batches()
    data[0]["x"][0, 0, 0] = float("inf")
    data[0]["attention_mask"][0, 0] = 0  # masked out: the loss ignores this token, Z's product does not (inf * 0)
    before = model_fingerprint(model)
    with pytest.raises(FloatingPointError, match=r"NaN/Inf in the input of module 'fc1a' \(shared by \['fc1a', 'fc1b'\]\) in batch 0"):
        lora_da.initialize(model, data, rank=2, target_modules=["fc1a", "fc1b", "fc2"], loss_fn=regression_loss, progress=False)
    assert_same_fingerprint(before, model_fingerprint(model))


def test_overflowing_gradient_names_module_and_batch():
    """fp16-style overflow in an output gradient (Inf) is caught after its batch."""

    class Blowup(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            return grad * float("inf")

    model = SharedInputMLP()
    calls = []

    def loss(model, batch):
        calls.append(1)
        out = model.fc2(Blowup.apply(model.hidden(batch["x"]))) if len(calls) == 2 else model(batch["x"])
        mask = batch["attention_mask"].bool()
        token_loss = (0.5 * (out - batch["target"]) ** 2).sum(-1).masked_fill(~mask, 0.0)
        counts = mask.sum(1)
        return (token_loss.sum(1) / counts.clamp(min=1))[counts > 0]

    before = model_fingerprint(model)
    with pytest.raises(FloatingPointError, match="NaN/Inf in the output gradient of module 'fc1a' in batch 1"):
        lora_da.initialize(model, regression_batches(), rank=2, target_modules=["fc1a", "fc2"], loss_fn=loss, progress=False)
    assert_same_fingerprint(before, model_fingerprint(model))


def test_nan_loss_names_the_batch():
    model = SharedInputMLP()
    data = regression_batches()
    data[2]["target"][0, 0, 0] = float("nan")
    data[2]["attention_mask"][0, 0] = 1
    with pytest.raises(FloatingPointError, match="the loss of batch 2 is nan"):
        lora_da.initialize(model, data, rank=2, target_modules=["fc2"], loss_fn=regression_loss, progress=False)


def test_train_size_default_warns():
    with pytest.warns(UserWarning, match="assumes a fine-tuning set of 6 samples"):
        lora_da.initialize(tiny_llama(), loader(), rank=2, progress=False)
