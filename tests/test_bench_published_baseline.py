"""bench/published_baseline.py keeps every tensor on the model's device.

On a GPU the model and its batches are on CUDA while tensors made without a
``device=`` land on the default device, the CPU: an accumulator made there and
``addmm_``-ed with CUDA rows is a crash. Here the same situation is made on a
CPU machine: the model and the batches stay on the CPU while the *default* device
is ``meta`` (``with torch.device("meta")``), so any tensor the baseline makes
without naming the model's device is a meta tensor, and mixing it with the
model's rows raises just as a CPU/CUDA mix would.
"""

from __future__ import annotations

import pathlib
import sys

import pytest
import torch

from lora_da.models import batches, synthetic_samples, tiny_llama

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "bench"))
import published_baseline  # noqa: E402

RANK = 4


@pytest.fixture(scope="module")
def model_and_data():
    model = tiny_llama(hidden_size=32, intermediate_size=48, num_layers=2)
    loader = list(batches(synthetic_samples(8, max_len=12), 4))
    return model, loader


@pytest.mark.parametrize("token_mask", ["attention", "all"])  # "all": the baseline makes its own mask
def test_baseline_makes_nothing_off_the_models_device(model_and_data, token_mask):
    model, loader = model_and_data
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    cpu_generator = torch.random.get_rng_state()
    with torch.device("meta"):
        result = published_baseline.published_initialize(model, loader, RANK, train_size=100, token_mask=token_mask)
    modules = published_baseline.find_target_modules(model, None, RANK)
    assert set(result.lora_A) == set(modules)
    for name, module in modules.items():
        assert result.lora_A[name].device.type == "cpu" and result.lora_B[name].device.type == "cpu"
        assert result.lora_A[name].shape == (RANK, module.in_features)
        assert result.lora_B[name].shape == (module.out_features, RANK)
        assert torch.isfinite(result.lora_A[name]).all() and torch.isfinite(result.lora_B[name]).all()
        guidance = result.guidance[name]
        assert guidance.device.type == "cpu" and torch.equal(guidance, guidance.T)
    assert result.passes == 1 and set(result.timings) == {"gradient pass", "factor passes", "factor prep", "solve", "total"}
    # the model and the caller's generator are left as found
    assert torch.equal(torch.random.get_rng_state(), cpu_generator)
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name


def test_factor_pass_sums_match_plain_autograd(model_and_data):
    """The baseline's Σ a aᵀ and Σ g² (under the meta default device) against hooks
    that recompute them in float64 on the same model and data."""
    model, loader = model_and_data
    modules = published_baseline.find_target_modules(model, None, RANK)
    name = next(iter(modules))
    with torch.device("meta"):
        input_sums, output_sums, num_tokens = published_baseline._factor_pass(model, loader, {name: modules[name]}, "attention")
    seen = {}
    module = modules[name]
    handles = [
        module.register_forward_hook(lambda m, args, out: seen.__setitem__("a", args[0].detach().double())),
        module.register_full_backward_hook(lambda m, gin, gout: seen.__setitem__("g", gout[0].detach().double())),
    ]
    z = torch.zeros(module.in_features, module.in_features, dtype=torch.float64)
    y = torch.zeros(module.out_features, dtype=torch.float64)
    count = 0
    try:
        for batch in loader:
            mask = batch["attention_mask"].bool()
            loss = published_baseline.causal_lm_per_sample_loss(model, batch).sum()
            loss.backward()
            a, g = seen["a"][mask], seen["g"][mask]
            z += a.T @ a
            y += (g * g).sum(0)
            count += int(mask.sum())
        model.zero_grad(set_to_none=True)
    finally:
        for handle in handles:
            handle.remove()
    assert num_tokens == count
    # fp32 accumulation of `count` products of fp32 values: relative error well under 1e-5 here
    torch.testing.assert_close(input_sums[name].double(), z, rtol=1e-5, atol=1e-6 * float(z.abs().max()))
    torch.testing.assert_close(output_sums[name].double(), y, rtol=1e-5, atol=1e-6 * float(y.abs().max()))
