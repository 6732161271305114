"""The statistics pass (lora_da/statistics_pass.py, collect_statistics): G, Z and y against a
token-loop oracle, autograd and plain hooks; token masks, padding, batch-size invariance,
shared-input detection, the forward-only pass; a property test over random shapes; NaN/Inf
traced to the first target module in forward order, host reads per batch, the progress bar.

fp64 models are used where results are compared across runs (batch-size
invariance), so that only accumulation order differs: agreement to 1e-8.
"""

import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tqdm.auto import tqdm as tqdm_auto

import lora_da
from lora_da import statistics_pass
from lora_da.models import batches, synthetic_samples, tiny_llama
from lora_da.targets import find_target_modules

from helpers import (
    SharedInputMLP,
    assert_same_fingerprint,
    model_fingerprint,
    oracle_statistics,
    principal_angle,
    regression_batches,
    regression_loss,
    rel_err,
)

pytestmark = pytest.mark.filterwarnings("ignore:train_size not given")


def test_statistics_match_token_loop():
    model, loader = SharedInputMLP(), regression_batches()
    G, Z, y, samples, tokens = oracle_statistics(model, loader)
    modules = find_target_modules(model, ["fc1a", "fc1b", "fc2"], rank=1)
    stats = lora_da.collect_statistics(model, loader, modules, loss_fn=regression_loss)
    assert stats.num_samples == samples and stats.num_tokens == tokens
    for name in ("fc1a", "fc1b", "fc2"):
        assert rel_err(stats.gradient(name), G[name]) < 1e-12, name
        assert rel_err(stats.input_factor(name), Z[name]) < 1e-12, name
        assert rel_err(stats.output_factor_diag(name), y[name]) < 1e-12, name
    groups = sorted(tuple(sorted(g.members)) for g in stats.groups)
    assert groups == [("fc1a", "fc1b"), ("fc2",)]


def test_forward_only_statistics_with_a_custom_loss_match_the_oracle():
    model = SharedInputMLP()
    data = regression_batches()
    calls = []

    def loss_fn(m, batch):
        calls.append(torch.is_grad_enabled())
        return regression_loss(m, batch)

    stats = lora_da.collect_statistics(
        model, data, {n: getattr(model, n) for n in ("fc1a", "fc1b", "fc2")}, loss_fn=loss_fn, forward_only=True
    )
    _, Z, _, samples, tokens = oracle_statistics(SharedInputMLP(), data)
    assert calls and not any(calls)
    assert not stats.has_gradients and stats.num_tokens == tokens and stats.num_samples == samples
    assert stats.modules["fc1a"].group_index == stats.modules["fc1b"].group_index  # sharing still detected
    for name in ("fc1a", "fc2"):
        torch.testing.assert_close(stats.input_factor(name), Z[name])
    with pytest.raises(ValueError, match="forward-only pass"):
        stats.gradient("fc2")


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


@pytest.mark.parametrize("bad", [-0.5, float("nan"), float("inf")])
def test_negative_or_non_finite_token_weights_are_refused_and_the_model_left_as_found(bad):
    """Z = Σ m·a aᵀ needs m ≥ 0 (the CPU kernel scales rows by √m): a mask entry below 0 or
    not finite is refused before the forward, by the mask's name and shape."""
    model = tiny_llama()
    loader = list(batches(synthetic_samples(4, seed=3), 2))

    def token_mask(batch):
        weights = batch["attention_mask"].to(torch.float32)
        weights[0, 0] = bad
        return weights

    before = model_fingerprint(model)
    with pytest.raises(ValueError, match=r"the token mask has 1 negative or non-finite entries \(shape \(2, \d+\)\)"):
        lora_da.initialize(model, loader, rank=2, token_mask=token_mask, progress=False)
    assert_same_fingerprint(before, model_fingerprint(model))
    fractional = lambda batch: batch["attention_mask"].to(torch.float32) * 0.5  # non-negative: accepted
    lora_da.initialize(model, loader, rank=2, token_mask=fractional, progress=False)


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


# -- property-based: statistics against the token-loop oracle ------------------------


@settings(max_examples=15, deadline=None)
@given(
    d_in=st.integers(1, 9),
    d_hidden=st.integers(1, 9),
    d_out=st.integers(1, 6),
    num_samples=st.integers(2, 7),
    seq_len=st.integers(1, 5),
    batch_size=st.integers(1, 4),
    seed=st.integers(0, 10_000),
)
def test_statistics_property(d_in, d_hidden, d_out, num_samples, seq_len, batch_size, seed):
    model = SharedInputMLP(d_in=d_in, d_hidden=d_hidden, d_out=d_out, seed=seed)
    data = regression_batches(num_samples=num_samples, seq_len=seq_len, d_in=d_in, d_out=d_out,
                              batch_size=batch_size, seed=seed)
    G, Z, y, samples, tokens = oracle_statistics(model, data)
    stats = lora_da.collect_statistics(
        model, data, find_target_modules(model, ["fc1a", "fc1b", "fc2"], rank=1), loss_fn=regression_loss
    )
    assert stats.num_samples == samples and stats.num_tokens == tokens
    assert stats.skipped_batches == sum(int(b["attention_mask"].sum() == 0) for b in data)
    for name in ("fc1a", "fc1b", "fc2"):
        torch.testing.assert_close(stats.gradient(name), G[name], rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(stats.input_factor(name), Z[name], rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(stats.output_factor_diag(name), y[name], rtol=1e-10, atol=1e-13)


# -- NaN/Inf traced to the first target module, in forward order ------------------------


def _with_nan(parameter_name):
    model = tiny_llama()
    with torch.no_grad():
        dict(model.named_parameters())[parameter_name].view(-1)[5] = float("nan")  # row 0: the pad token
    return model


def test_nan_weight_is_traced_to_the_first_target_whose_output_is_non_finite():
    """One NaN in up_proj's weight makes the loss NaN: the message names up_proj (its output
    is the first non-finite one in forward order; gate_proj, sharing its input, is finite) and the batch."""
    model = _with_nan("model.layers.1.mlp.up_proj.weight")
    loader = list(batches(synthetic_samples(4, seed=1), 2))
    with pytest.raises(
        FloatingPointError,
        match=r"^the loss of batch 0 is nan; the first non-finite value in forward order is the output of "
        r"target module 'model\.layers\.1\.mlp\.up_proj' \(its input was finite\)$",
    ):
        lora_da.initialize(model, loader, rank=2, progress=False)


def test_nan_before_any_target_is_traced_to_the_first_targets_input():
    model = _with_nan("model.embed_tokens.weight")
    loader = list(batches(synthetic_samples(4, seed=1), 2))
    with pytest.raises(
        FloatingPointError,
        match=r"^the loss of batch 0 is nan; the input of the first target module "
        r"'model\.layers\.0\.self_attn\.q_proj' \(in forward order\) was already non-finite: no target module's "
        r"output was non-finite before it, the NaN/Inf starts before any target module \(e\.g\. in the embedding\)$",
    ):
        lora_da.initialize(model, loader, rank=2, progress=False)


def test_nan_after_the_targets_says_so():
    model = SharedInputMLP()
    data = regression_batches()
    data[1]["target"][0, 0, 0] = float("nan")  # in the loss, after every target
    data[1]["attention_mask"][0, 0] = 1
    with pytest.raises(FloatingPointError, match=r"^the loss of batch 1 is nan; no target module's input or output "
                       r"was non-finite: it arises after the last target module \(or in the loss\)$"):
        lora_da.collect_statistics(model, data, {n: getattr(model, n) for n in ("fc1a", "fc2")}, loss_fn=regression_loss)


HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "numpy", "cpu")


@pytest.mark.parametrize("token_mask,reads_per_batch", [("all", 1), ("attention", 2)])
def test_one_host_read_per_batch_after_the_forward(monkeypatch, token_mask, reads_per_batch):
    """Host reads of the pass's own code (lora_da.*; not the model's): one per batch after the
    forward+backward (the loss and every finiteness flag together), plus, with a token mask,
    one before it (the kept tokens). The NaN tracing adds none."""
    model = tiny_llama()
    loader = list(batches(synthetic_samples(6, seed=2), 2))
    modules = find_target_modules(model, None, rank=2)
    reads = []
    for method in HOST_READS:
        original = getattr(torch.Tensor, method)

        def counting(self, *args, _original=original, _method=method, **kwargs):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.split(".")[0] == "lora_da":
                reads.append((caller, _method))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, method, counting)
    # check_totals=False: without the end-of-pass checks of KFACStatistics (once per pass, not per batch)
    stats = lora_da.collect_statistics(model, loader, modules, token_mask=token_mask, check_totals=False)
    monkeypatch.undo()
    assert stats.num_batches == 3
    assert len(reads) == reads_per_batch * stats.num_batches, reads


class _RecordingBar(tqdm_auto):
    bars = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.bars.append(self)


def test_progress_bar_counts_batches_done(monkeypatch):
    """The bar advances after a batch, not before it: a failing batch is not counted."""
    monkeypatch.setattr(statistics_pass, "tqdm", _RecordingBar)
    _RecordingBar.bars = []
    model = SharedInputMLP()
    data = regression_batches()
    data[2]["target"][0, 0, 0] = float("nan")
    data[2]["attention_mask"][0, 0] = 1
    modules = {n: getattr(model, n) for n in ("fc1a", "fc2")}
    with pytest.raises(FloatingPointError, match="the loss of batch 2 is nan"):
        lora_da.collect_statistics(model, data, modules, loss_fn=regression_loss, progress=True)
    assert _RecordingBar.bars[-1].n == 2  # batches 0 and 1 done
    stats = lora_da.collect_statistics(model, regression_batches(), modules, loss_fn=regression_loss, progress=True)
    assert _RecordingBar.bars[-1].n == stats.num_batches == len(regression_batches())
