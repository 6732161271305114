"""Numerical safeguards, determinism, resumable statistics and unusual inputs."""

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lora_da
from lora_da.methods.lora_da_reference import prepare_input_factor
from lora_da.models import batches, synthetic_samples, tiny_llama
from lora_da.targets import find_target_modules

import kill_worker
from helpers import (
    SharedInputMLP,
    assert_same_fingerprint,
    model_fingerprint,
    oracle_statistics,
    regression_batches,
    regression_loss,
)

pytestmark = pytest.mark.filterwarnings("ignore:train_size not given")


def assert_equal_inits(a, b):
    assert a.modules.keys() == b.modules.keys()
    for name, m in a.modules.items():
        assert torch.equal(m.lora_A, b.modules[name].lora_A), name
        assert torch.equal(m.lora_B, b.modules[name].lora_B), name


# -- numerics ---------------------------------------------------------------------


def test_non_positive_definite_factor_escalates_damping_by_the_rule():
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    z = q @ torch.diag(torch.tensor([-1.5e-4, 1, 2, 3, 4, 5], dtype=torch.float64)) @ q.T
    with pytest.warns(RuntimeWarning, match="not positive definite with damping 1e-06; used damping 0.001"):
        prepared = prepare_input_factor(z, 1e-6, "layer.x")
    # rule: floor = max(λ, 1e-12·tr/d) = 1e-6 here; 1e-5 and 1e-4 fail, 1e-3 succeeds
    assert prepared.damping == pytest.approx(1e-3)
    torch.testing.assert_close(prepared.cholesky @ prepared.cholesky.T, z + 1e-3 * torch.eye(6, dtype=torch.float64))


def test_hopeless_factor_is_reported_not_used():
    z = torch.diag(torch.tensor([-1e6, 1.0], dtype=torch.float64))  # beyond λ·10^8
    with pytest.raises(FloatingPointError, match="module 'bad' is not positive definite"):
        prepare_input_factor(z, 1e-6, "bad")
    with pytest.raises(FloatingPointError):
        prepare_input_factor(torch.full((3, 3), float("nan"), dtype=torch.float64), 1e-6, "nan")


def test_rank_deficient_inputs_with_tiny_damping_escalate_and_are_recorded():
    """Dead input features and fewer tokens than d_in: Z is singular."""
    model = SharedInputMLP(d_in=12, d_hidden=7)
    data = regression_batches(num_samples=3, seq_len=2, d_in=12, batch_size=3)  # at most 6 tokens < 12
    data[0]["x"][..., :4] = 0.0  # dead features
    with pytest.warns(RuntimeWarning, match="input factor Z of module 'fc1a' is not positive definite"):
        init = lora_da.initialize(model, data, rank=2, target_modules=["fc1a", "fc2"], damping=1e-30,
                                  loss_fn=regression_loss, train_size=10, progress=False)
    assert init.modules["fc1a"].damping > 1e-30
    assert init.modules["fc2"].damping >= 1e-30
    for m in init.modules.values():
        assert torch.isfinite(m.lora_A).all() and torch.isfinite(m.lora_B).all()


# -- determinism ------------------------------------------------------------------


def test_cpu_runs_are_bitwise_identical():
    data = list(batches(synthetic_samples(8, seed=5), 4))
    first = lora_da.initialize(tiny_llama(), data, rank=4, progress=False)
    second = lora_da.initialize(tiny_llama(), data, rank=4, progress=False)
    assert_equal_inits(first, second)
    for m in first.modules.values():  # sign convention: largest-magnitude entry of each A₀ column positive
        a0 = m.lora_A.T
        index = a0.abs().argmax(dim=0)
        assert torch.all(a0[index, torch.arange(a0.shape[1])] > 0)


@pytest.mark.cuda
def test_cuda_runs_agree_to_stated_tolerance():
    """On CUDA, atomics-free kernels still reorder sums across runs and devices:
    factors agree to 1e-4 relative (float32 statistics), subspaces to 1e-3 rad."""
    from helpers import principal_angle

    data = list(batches(synthetic_samples(8, seed=5), 4))
    first = lora_da.initialize(tiny_llama().cuda(), data, rank=4, progress=False)
    second = lora_da.initialize(tiny_llama().cuda(), data, rank=4, progress=False)
    cpu = lora_da.initialize(tiny_llama(), data, rank=4, progress=False)
    for name, m in first.modules.items():
        torch.testing.assert_close(m.lora_A, second.modules[name].lora_A, rtol=1e-4, atol=1e-6)
        assert principal_angle(m.lora_A.T.cpu(), cpu.modules[name].lora_A.T) < 1e-3, name


# -- resumable statistics ------------------------------------------------------------


def llama_data():
    return kill_worker.data()


def run(path, loader, **kwargs):
    return lora_da.initialize(
        tiny_llama(dtype=torch.float64), loader, rank=2, train_size=50, progress=False,
        stats_checkpoint=path, checkpoint_every=kwargs.pop("every", 1), **kwargs,
    )


def interrupted(at):
    for index, batch in enumerate(llama_data()):
        if index == at:
            raise KeyboardInterrupt
        yield batch


def test_ctrl_c_then_resume_gives_the_uninterrupted_result(tmp_path):
    path = tmp_path / "stats.ckpt"
    reference = lora_da.initialize(tiny_llama(dtype=torch.float64), llama_data(), rank=2, train_size=50, progress=False)
    model = tiny_llama(dtype=torch.float64)
    before = model_fingerprint(model)
    with pytest.raises(KeyboardInterrupt):
        lora_da.initialize(model, interrupted(3), rank=2, train_size=50, progress=False,
                           stats_checkpoint=str(path), checkpoint_every=2)
    assert_same_fingerprint(before, model_fingerprint(model))
    assert path.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".lora-da-stats-")]
    resumed = run(str(path), llama_data(), every=2)
    assert resumed.num_batches == 5 and resumed.num_samples == reference.num_samples
    assert_equal_inits(resumed, reference)
    again = run(str(path), llama_data())  # a finished pass is read back, not rerun
    assert_equal_inits(again, reference)


def test_killed_process_resumes_to_the_same_factors(tmp_path):
    path = tmp_path / "stats.ckpt"
    child = subprocess.run(
        [sys.executable, kill_worker.__file__, str(path)], cwd=os.path.dirname(kill_worker.__file__),
        capture_output=True, timeout=300,
    )
    assert child.returncode == -9, child.stderr.decode()[-2000:]
    assert path.exists()
    reference = lora_da.initialize(tiny_llama(dtype=torch.float64), llama_data(), rank=2, train_size=50, progress=False)
    resumed = run(str(path), llama_data())
    assert_equal_inits(resumed, reference)


def test_mismatched_or_corrupt_checkpoint_is_refused(tmp_path):
    path = tmp_path / "stats.ckpt"
    run(str(path), llama_data()[:2])
    with pytest.raises(ValueError, match=r"belongs to another configuration \(differs in: token_mask\)"):
        run(str(path), llama_data(), token_mask="labels")
    with pytest.raises(ValueError, match=r"differs in: modules"):
        run(str(path), llama_data(), target_modules=["q_proj"])
    record = torch.load(path, weights_only=False)
    payload = bytearray(record["payload"])
    payload[len(payload) // 2] ^= 0xFF
    record["payload"] = bytes(payload)
    torch.save(record, path)
    with pytest.raises(ValueError, match="corrupt"):
        run(str(path), llama_data())


# -- inputs -------------------------------------------------------------------------


def test_tuple_and_batch_encoding_batches_match_dicts():
    from transformers import BatchEncoding

    data = list(batches(synthetic_samples(6, seed=8), 3))
    as_dicts = lora_da.initialize(tiny_llama(), data, rank=2, progress=False)
    as_tuples = lora_da.initialize(
        tiny_llama(), [(b["input_ids"], b["attention_mask"], b["labels"]) for b in data], rank=2, progress=False
    )
    as_encodings = lora_da.initialize(tiny_llama(), [BatchEncoding(b) for b in data], rank=2, progress=False)
    assert_equal_inits(as_dicts, as_tuples)
    assert_equal_inits(as_dicts, as_encodings)


def test_samples_without_labels_are_skipped_and_counted():
    samples = synthetic_samples(5, seed=9)
    samples[2]["labels"][:] = -100
    init = lora_da.initialize(tiny_llama(), list(batches(samples, 5)), rank=2, token_mask="attention", progress=False)
    assert init.num_samples == 4 and init.skipped_samples == 1


def test_tied_output_head_is_not_a_target():
    model = tiny_llama()
    model.config.tie_word_embeddings = True
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    init = lora_da.initialize(model, list(batches(synthetic_samples(4), 2)), rank=2, progress=False)
    assert "lm_head" not in init.modules and len(init.modules) == 14


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=128, n_positions=64, n_embd=32, n_layer=2, n_head=4)).eval()


def test_gpt2_conv1d_supported_with_transposed_weight():
    from peft import LoraConfig, get_peft_model

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


class FakeQuantizedLinear(nn.Linear):
    """bitsandbytes-style: an int8 weight with a per-row scale; forward dequantizes."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None)
        scale = linear.weight.detach().abs().amax(dim=1, keepdim=True) / 127
        self.weight = nn.Parameter(torch.round(linear.weight.detach() / scale).to(torch.int8), requires_grad=False)
        self.register_buffer("scale", scale)
        if linear.bias is not None:
            self.bias = nn.Parameter(linear.bias.detach().clone())

    def dequantized(self):
        return self.weight.to(self.scale.dtype) * self.scale

    def forward(self, x):
        return nn.functional.linear(x, self.dequantized(), self.bias)


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


@pytest.mark.cuda
def test_batches_on_the_wrong_device_are_moved():
    model = tiny_llama().cuda()
    data = list(batches(synthetic_samples(4), 2))  # CPU tensors
    init = lora_da.initialize(model, data, rank=2, progress=False)
    assert next(iter(init.modules.values())).lora_A.is_cuda


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
