"""The statistics pass under activation checkpointing (lora_da/activation_checkpointing.py and
the collector's recomputation path): with transformers' checkpointing on, reentrant or not, the
layers really are recomputed during the backward, the factors equal those without
checkpointing, dropout stays off and the model is left exactly as found.

Tolerance: float64 models; the checkpointed pass recomputes the same operations on the same
inputs (the anchor adds an exact zero), so G, Z and y agree to 1e-12 relative (in practice
bitwise); an extra count of a recomputed forward would double Z (error 1), dropout left on
would change everything by O(1).
"""

import pytest
import torch

import lora_da
from lora_da import statistics_pass
from lora_da.losses import causal_lm_per_sample_loss
from lora_da.models import batches, synthetic_samples, tiny_llama
from lora_da.targets import find_target_modules

pytest.importorskip("transformers")

from test_module_tokens import t5_batches, tiny_t5  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:train_size not given"),
    pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated"),
]

TOL = 1e-12


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def dropout_llama():
    """A float64 tiny Llama whose attention dropout would be on in training mode."""
    model = tiny_llama(dtype=torch.float64, num_layers=3)
    model.config.attention_dropout = 0.5
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.5
    return model


def data():
    return list(batches(synthetic_samples(6, seed=4), 3))


def snapshot(model):
    return (
        [(n, m.training, getattr(m, "gradient_checkpointing", None)) for n, m in model.named_modules()],
        [(n, p.requires_grad, p.grad is None) for n, p in model.named_parameters()],
        [(n, len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks)) for n, m in model.named_modules()],
    )


def test_checkpointed_layers_really_checkpoint_in_training_mode():
    """The premise: transformers recomputes a checkpointed layer only in training mode, which
    the old pass (eval mode) skipped silently."""
    model = dropout_llama()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    calls = []
    model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda *a: calls.append(torch.is_grad_enabled()))
    modules = find_target_modules(model, None, rank=2)
    lora_da.collect_statistics(model, data(), modules)
    assert len(calls) == 2 * 2  # 2 batches, each: the forward and the backward's recomputation


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("train_mode", [False, True])
def test_checkpointed_pass_gives_the_factors_of_the_plain_pass(reentrant, train_mode):
    loader = data()
    plain = dropout_llama()
    reference = lora_da.collect_statistics(plain, loader, find_target_modules(plain, None, rank=2))

    model = dropout_llama()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.train(train_mode)
    before = snapshot(model)
    calls = []
    model.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda *a: calls.append(1))
    before = snapshot(model)
    stats = lora_da.collect_statistics(model, loader, find_target_modules(model, None, rank=2))
    assert snapshot(model) == before  # flags, checkpointing, hooks, requires_grad, no .grad
    assert len(calls) == 2 * len(loader)  # the layer was recomputed in each backward
    assert stats.num_tokens == reference.num_tokens and stats.num_samples == reference.num_samples
    for name in reference.modules:
        assert stats.modules[name].num_tokens == reference.modules[name].num_tokens, name
        assert rel(stats.input_factor(name), reference.input_factor(name)) < TOL, name
        assert rel(stats.output_factor_diag(name), reference.output_factor_diag(name)) < TOL, name
        assert rel(stats.gradient(name), reference.gradient(name)) < TOL, name


def test_initialize_under_checkpointing_matches_and_keeps_targets_outside_the_layers():
    """lm_head (outside every checkpointed layer) keeps its input from the forward; the layers'
    targets get theirs from the recomputation; the LoRA factors agree."""
    loader = data()
    plain = dropout_llama()
    targets = ["q_proj", "down_proj", "lm_head"]
    reference = lora_da.initialize(plain, loader, rank=2, target_modules=targets, progress=False, solver="eigh")
    model = dropout_llama()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    init = lora_da.initialize(model, loader, rank=2, target_modules=targets, progress=False, solver="eigh")
    assert set(init.modules) == set(reference.modules) and "lm_head" in init.modules
    for name, want in reference.modules.items():
        got = init.modules[name]
        assert rel(got.lora_A.double(), want.lora_A.double()) < 1e-6, name  # float32 factors
        assert rel(got.lora_B.double(), want.lora_B.double()) < 1e-6, name


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_forward_keeps_no_input_of_a_checkpointed_layer(monkeypatch, checkpointing):
    """What saves the memory: after the forward, the collector holds the inputs (for G) of the
    targets outside checkpointed layers only (here lm_head); without checkpointing, of all."""
    collectors = []

    class Recording(statistics_pass.Collector):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            collectors.append(self)

    monkeypatch.setattr(statistics_pass, "Collector", Recording)
    held = []

    def loss_fn(model, batch):
        losses = causal_lm_per_sample_loss(model, batch)
        held.append(sorted(collectors[-1].rows_of))  # the forward is done, the backward not begun
        return losses

    model = dropout_llama()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    modules = find_target_modules(model, ["q_proj", "down_proj", "lm_head"], rank=2)
    lora_da.collect_statistics(model, data(), modules, loss_fn=loss_fn)
    expected = ["lm_head"] if checkpointing else sorted(modules)
    assert held == [expected] * 2


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointed_t5_keeps_each_modules_own_tokens(reentrant):
    """Encoder and decoder blocks checkpointed, cross-attention fed the encoder's output: the
    per-module masks and counts of the first forward hold, the sums equal the plain pass's."""
    loader = t5_batches(12, 5)
    plain = tiny_t5()
    reference = lora_da.collect_statistics(plain, loader, find_target_modules(plain, None, rank=2))
    model = tiny_t5()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    calls = []
    model.decoder.block[1].layer[1].EncDecAttention.k.register_forward_pre_hook(lambda *a: calls.append(1))
    stats = lora_da.collect_statistics(model, loader, find_target_modules(model, None, rank=2))
    assert len(calls) == 2 * len(loader)
    for name in reference.modules:
        assert stats.modules[name].num_tokens == reference.modules[name].num_tokens, name
        assert rel(stats.input_factor(name), reference.input_factor(name)) < TOL, name
        assert rel(stats.output_factor_diag(name), reference.output_factor_diag(name)) < TOL, name
        assert rel(stats.gradient(name), reference.gradient(name)) < TOL, name


class _SelfCheckpointed(torch.nn.Module):
    """A model that checkpoints its blocks in its own code (not transformers' layers), in any mode."""

    def __init__(self, checkpointing):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Tanh(), torch.nn.Linear(6, 6)) for _ in range(2)
        )
        self.checkpointing = checkpointing
        self.double()

    def forward(self, x):
        for block in self.blocks:
            if self.checkpointing:
                x = x + torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = x + block(x)
        return x


def test_a_model_checkpointing_in_its_own_code_non_reentrant_gives_the_plain_sums():
    """Not recognized as checkpointed: its inputs are kept from the first forward (no saving),
    the recomputation is ignored, the sums equal the plain model's."""
    g = torch.Generator().manual_seed(5)
    loader = [{"x": torch.randn(3, 4, 6, generator=g, dtype=torch.float64)} for _ in range(2)]

    def loss_fn(model, batch):
        return (model(batch["x"]) ** 2).sum(dim=(1, 2))

    results = []
    for checkpointing in (False, True):
        model = _SelfCheckpointed(checkpointing)
        modules = {f"blocks.{i}.{j}": model.blocks[i][j] for i in range(2) for j in (0, 2)}
        calls = []
        model.blocks[1][0].register_forward_hook(lambda *a: calls.append(1))
        results.append(lora_da.collect_statistics(model, loader, modules, loss_fn=loss_fn, token_mask="all"))
        assert len(calls) == (2 if checkpointing else 1) * len(loader)
    plain, checkpointed = results
    for name in plain.modules:
        assert rel(checkpointed.input_factor(name), plain.input_factor(name)) < TOL, name
        assert rel(checkpointed.output_factor_diag(name), plain.output_factor_diag(name)) < TOL, name
        assert rel(checkpointed.gradient(name), plain.gradient(name)) < TOL, name
