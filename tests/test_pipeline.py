"""The driver (lora_da/pipeline.py) and its entry point (lora_da/api.py): what every method gets
from it — targets, the loader rules, the memory budget and its passes, checkpoints, phase
timings, the train-size warning, determinism — and initialize's clear errors, after which
the model is left exactly as found.

Multi-pass results are compared with the one-pass result on an fp64 model: each
pass accumulates the same sums for its modules in the same order, so factors
agree to rounding (1e-10 relative on σ, 1e-7 on the fp32 factors).
"""

import os
import sys
import warnings

import pytest
import torch

import lora_da
from lora_da.memory import StatisticsSizes, module_statistics_bytes, solve_reserve
from lora_da.models import batches, synthetic_samples, tiny_llama
from lora_da.naming import layer_prefix as layer_of
from lora_da.pipeline import PHASES
from lora_da.targets import find_target_modules

from helpers import (
    ALL_METHODS,
    DATA_METHODS,
    NO_DATA_METHODS,
    FakeQuantizedLinear,
    SharedInputMLP,
    assert_equal_inits,
    assert_same_fingerprint,
    model_fingerprint,
    regression_batches,
    regression_loss,
    tiny64,
)
from helpers import METHOD_RANK as RANK
from helpers import run_method as run

# a float32 model's accumulators by default: Z in float64, G and y in float32 (docs/math.md §5.6)
SIZES = StatisticsSizes(input_factor=8, gradient=4)

pytestmark = pytest.mark.filterwarnings("ignore:train_size not given")


# -- end to end ------------------------------------------------------------------


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


# -- the loader, the targets and initialize's errors; the model left as found -------


def test_loader_none_only_for_methods_that_read_no_data():
    for method in ("lora-da", "lora-ga", "lora-one", "cntlora", "fisher-subspace"):
        with pytest.raises(ValueError, match=f"method '{method}' needs calibration data"):
            lora_da.initialize(tiny_llama(), None, rank=2, method=method, progress=False)


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


def llama_loader():
    return list(batches(synthetic_samples(6, seed=3), 3))


def test_success_leaves_model_as_found(llama):
    before = model_fingerprint(llama)
    lora_da.initialize(llama, llama_loader(), rank=2, progress=False)
    assert_same_fingerprint(before, model_fingerprint(llama))


def no_labels_loader():
    return [{k: v for k, v in b.items() if k != "labels"} for b in llama_loader()]


def all_masked_loader():
    out = llama_loader()
    for b in out:
        b["attention_mask"].zero_()
    return out


def failing_loss(model, batch):
    model(input_ids=batch["input_ids"])
    raise KeyboardInterrupt  # the user's code (or Ctrl-C) interrupts mid-pass


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(rank=17, target_modules=["k_proj"]), ValueError, r"rank=17 exceeds min\(d_in, d_out\)=16 of module 'model.layers.0.self_attn.k_proj'"),
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
    data = special[kwargs.pop("loader")]() if "loader" in kwargs else llama_loader()
    rank = kwargs.pop("rank", 2)
    before = model_fingerprint(llama)
    with pytest.raises(error, match=match):
        lora_da.initialize(llama, data, rank=rank, progress=False, **kwargs)
    assert_same_fingerprint(before, model_fingerprint(llama))


def test_empty_batch_is_skipped_and_counted():
    model = tiny_llama(dtype=torch.float64)
    data = llama_loader()
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
        lora_da.initialize(tiny_llama(), llama_loader(), rank=2, progress=False)


@pytest.mark.parametrize("method", ["pissa", "milora", "cntlora"])
def test_weight_reading_methods_refuse_an_int8_module_by_name(method):
    model = SharedInputMLP(dtype=torch.float32)
    model.fc1b = FakeQuantizedLinear(model.fc1b)
    data = None if method != "cntlora" else regression_batches(dtype=torch.float32)
    with pytest.raises(TypeError, match="module 'fc1b' has a torch.int8 weight"):
        lora_da.initialize(model, data, rank=2, loss_fn=regression_loss, progress=False, method=method)


# one method per kind of pass: none (lora; pissa reads W), forward only, full
@pytest.mark.parametrize("method", ["lora", "pissa", "cntlora", "fisher-subspace"])
def test_model_left_exactly_as_found(method, data):
    model = tiny_llama()
    model.model.layers[0].train()
    before = model_fingerprint(model)
    run(method, data, model=model)
    assert_same_fingerprint(before, model_fingerprint(model))


# -- checkpoints -------------------------------------------------------------------


def test_one_full_checkpoint_serves_every_method(data, tmp_path):
    path = str(tmp_path / "stats.pt")
    lora_da.initialize(tiny64(), data, rank=RANK, progress=False, stats_checkpoint=path)  # the full pass, once
    for method in ("lora-ga", "lora-one", "fisher-subspace", "cntlora"):
        calls = []

        def counting_loader(calls=calls):
            for batch in data:
                calls.append(1)
                yield batch

        from_checkpoint = run(method, counting_loader(), stats_checkpoint=path)
        fresh = run(method, data)
        for name, m in fresh.modules.items():
            torch.testing.assert_close(from_checkpoint.modules[name].lora_A, m.lora_A, rtol=1e-6, atol=1e-9)
            torch.testing.assert_close(from_checkpoint.modules[name].lora_B, m.lora_B, rtol=1e-6, atol=1e-9)
    # a forward-only checkpoint cannot serve a gradient method
    forward_path = str(tmp_path / "forward.pt")
    run("cntlora", data, stats_checkpoint=forward_path)
    with pytest.raises(ValueError, match="holds a forward-only pass"):
        run("lora-one", data, stats_checkpoint=forward_path)


# -- the memory budget: several passes ----------------------------------------------


def _exact_statistics_bytes(init: lora_da.LoraInit, element_size: int) -> int:
    """Σ over input groups of d_in² plus Σ over modules of d_out·d_in + d_out (independent of the code's sizes)."""
    total = 0
    for group in init.input_groups:
        d_in = init.modules[group[0]].lora_A.shape[1]
        total += d_in * d_in
    for module in init.modules.values():
        d_out, d_in = module.lora_B.shape[0], module.lora_A.shape[1]
        total += d_out * d_in + d_out
    return total * element_size


def test_multi_pass_equals_one_pass_and_reports_memory():
    model = tiny_llama(num_layers=3, dtype=torch.float64)
    loader = list(batches(synthetic_samples(8, seed=4), 4))
    before = model_fingerprint(model)
    one = lora_da.initialize(model, loader, rank=2, progress=False)
    targets = find_target_modules(model, None, 2)
    layer_statistics = sum(module_statistics_bytes(m, 8) for name, m in targets.items() if layer_of(name) == "model.layers.0")
    layer_budget = layer_statistics + solve_reserve(targets)  # max_memory also holds the solve's share
    split = lora_da.initialize(model, loader, rank=2, progress=False, max_memory=layer_budget)
    assert_same_fingerprint(before, model_fingerprint(model))

    assert one.passes == 1 and split.passes == 3
    assert one.statistics_bytes == _exact_statistics_bytes(one, 8)
    assert split.statistics_bytes == _exact_statistics_bytes(one, 8) // 3  # equal layers
    assert split.statistics_bytes <= layer_statistics
    assert split.num_tokens == one.num_tokens and split.num_samples == one.num_samples
    assert list(split.modules) == list(one.modules)
    for name, m in one.modules.items():
        other = split.modules[name]
        assert abs(other.sigma - m.sigma) <= 1e-10 * m.sigma, name
        torch.testing.assert_close(other.lora_A, m.lora_A, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(other.lora_B, m.lora_B, rtol=1e-6, atol=1e-7)
        assert other.input_group == m.input_group
    for phase in ("forward_backward", "statistics_accumulate", "factor_prep", "solve"):
        assert split.timings[phase] > 0, phase


def test_the_plan_counts_each_accumulator_at_its_own_size():
    """A float32 model's Z is summed in float64 by default (G and y in float32): the plan must
    count Z at 8 bytes, or a pass's real statistics exceed the share it was planned for."""
    model = tiny_llama(num_layers=3)
    loader = list(batches(synthetic_samples(8, seed=4), 4))
    targets = find_target_modules(model, None, 2)
    share = sum(module_statistics_bytes(m, 4) for name, m in targets.items() if layer_of(name) == "model.layers.0")
    init = lora_da.initialize(model, loader, rank=2, progress=False, max_memory=share + solve_reserve(targets))
    assert init.passes > 3  # a layer, with Z at 8 bytes, no longer fits in one pass
    assert init.statistics_bytes <= share
    exact = lora_da.initialize(model, loader, rank=2, progress=False, statistics_precision="float32",
                               max_memory=share + solve_reserve(targets))
    assert exact.passes == 3 and exact.statistics_bytes <= share  # the plan counts a Z per module: an upper bound


def test_one_shot_loader_refused_when_several_passes_are_needed():
    model = tiny_llama(num_layers=2)
    before = model_fingerprint(model)
    one_shot = iter(list(batches(synthetic_samples(4), 2)))
    targets = find_target_modules(model, None, 2)
    largest_module = max(module_statistics_bytes(m, SIZES) for m in targets.values()) + solve_reserve(targets)
    with pytest.raises(ValueError, match="one-shot iterator.*max_memory|max_memory.*one-shot iterator"):
        lora_da.initialize(model, one_shot, rank=2, progress=False, max_memory=largest_module)
    assert_same_fingerprint(before, model_fingerprint(model))
    # one pass: a generator is fine
    init = lora_da.initialize(model, (b for b in batches(synthetic_samples(4), 2)), rank=2, progress=False)
    assert init.passes == 1


def test_multi_pass_checkpoints_read_back(tmp_path):
    model = tiny_llama(num_layers=2, dtype=torch.float64)
    loader = list(batches(synthetic_samples(6, seed=5), 3))
    path = str(tmp_path / "stats.pt")
    targets = find_target_modules(model, None, 2)
    budget = max(module_statistics_bytes(m, 8) for m in targets.values()) + solve_reserve(targets)
    first = lora_da.initialize(model, loader, rank=2, progress=False, max_memory=budget, stats_checkpoint=path)
    assert first.passes >= 2
    saved = sorted(p.name for p in tmp_path.iterdir())
    assert saved == [f"stats.pt.pass{i}" for i in range(first.passes)]
    again = lora_da.initialize(model, loader, rank=2, progress=False, max_memory=budget, stats_checkpoint=path)
    for name, m in first.modules.items():
        assert torch.equal(m.lora_A, again.modules[name].lora_A), name


# -- what the driver gives every method -------------------------------------------------


@pytest.mark.parametrize("method", ["lora-ga", "lora-one", "fisher-subspace", "cntlora"])
def test_multi_pass_equals_one_pass_for_other_data_methods(method):
    """The memory budget serves every data method, not only lora-da (cntlora: forward-only passes)."""
    model = tiny_llama(num_layers=3, dtype=torch.float64)
    loader = list(batches(synthetic_samples(8, seed=4), 4))
    before = model_fingerprint(model)
    kwargs = dict(rank=2, progress=False, method=method, train_size=100)
    one = lora_da.initialize(model, loader, **kwargs)
    targets = find_target_modules(model, None, 2)
    layer_statistics = sum(module_statistics_bytes(m, 8) for name, m in targets.items() if layer_of(name) == "model.layers.0")
    layer_budget = layer_statistics + solve_reserve(targets)  # max_memory also holds the solve's share
    split = lora_da.initialize(model, loader, max_memory=layer_budget, **kwargs)
    assert_same_fingerprint(before, model_fingerprint(model))

    assert one.passes == 1 and split.passes == 3
    assert split.statistics_bytes <= layer_statistics < one.statistics_bytes
    assert split.num_tokens == one.num_tokens and split.num_samples == one.num_samples
    assert split.backends == one.backends
    assert list(split.modules) == list(one.modules)
    for name, m in one.modules.items():
        other = split.modules[name]
        assert other.rank == m.rank and other.input_group == m.input_group, name
        assert abs(other.sigma - m.sigma) <= 1e-10 * m.sigma, name
        torch.testing.assert_close(other.eigenvalues, m.eigenvalues, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(other.lora_A, m.lora_A, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(other.lora_B, m.lora_B, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_every_method_reports_the_phase_timings(method, data):
    init = run(method, data, model=tiny_llama(), rank=2, train_size=100)
    phases = set(PHASES) | {"total"}
    assert phases == {"forward_backward", "statistics_accumulate", "factor_prep", "solve", "total"}
    assert set(init.timings) == phases, init.timings
    assert all(t >= 0 for t in init.timings.values())
    assert sum(init.timings[p] for p in PHASES) <= init.timings["total"] * (1 + 1e-9)
    assert init.timings["solve"] > 0
    if method in NO_DATA_METHODS:
        assert init.timings["forward_backward"] == init.timings["statistics_accumulate"] == 0.0
        assert init.num_batches == 0 and "statistics" not in init.backends
    else:
        assert init.timings["forward_backward"] > 0 and init.timings["statistics_accumulate"] > 0
        assert init.num_batches == len(data)
    if method == "lora-da":
        assert init.timings["factor_prep"] > 0
    assert init.report()["timings_s"] == init.timings
    assert init.backends["solve"]


@pytest.mark.parametrize("method", DATA_METHODS)
def test_train_size_warning_only_for_lora_da_and_at_the_callers_line(method, data):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        init = lora_da.initialize(tiny_llama(), data, rank=2, progress=False, method=method)
    about_train_size = [w for w in caught if "train_size" in str(w.message)]
    assert init.train_size == init.num_samples == 8  # the calibration set's size, for every method
    if method == "lora-da":
        assert len(about_train_size) == 1
        warning = about_train_size[0]
        assert issubclass(warning.category, UserWarning)
        assert "train_size not given: the variance term assumes a fine-tuning set of 8 samples" in str(warning.message)
        assert warning.filename == __file__  # the caller's line, not lora_da's internals
    else:
        assert not about_train_size, [str(w.message) for w in about_train_size]
    # through initialize_from_config too; and no warning once train_size is given
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lora_da.initialize_from_config(tiny_llama(), data, lora_da.LoraDAConfig(rank=2, progress=False, method=method))
        lora_da.initialize(tiny_llama(), data, rank=2, progress=False, method=method, train_size=100)
    about_train_size = [w for w in caught if "train_size" in str(w.message)]
    assert [w.filename for w in about_train_size] == ([__file__] if method == "lora-da" else [])


def test_each_pass_frees_the_previous_pass_statistics_before_collecting(monkeypatch):
    """Under several passes, nothing (the solve's context included) keeps an earlier pass's
    sums alive while the next pass runs: peak = one pass's statistics, not all of them."""
    import weakref

    from lora_da import pipeline

    earlier = []
    real = pipeline.statistics_pass

    def spy(*args, **kwargs):
        alive = [name for name, ref in earlier if ref() is not None]
        assert not alive, f"statistics of pass(es) {alive} still alive when the next pass starts"
        stats = real(*args, **kwargs)
        earlier.append((len(earlier), weakref.ref(stats)))
        return stats

    monkeypatch.setattr(pipeline, "statistics_pass", spy)
    model = tiny_llama(num_layers=3)
    targets = find_target_modules(model, None, 2)
    layer_budget = solve_reserve(targets) + sum(
        module_statistics_bytes(m, SIZES) for name, m in targets.items() if layer_of(name) == "model.layers.0"
    )
    init = lora_da.initialize(model, list(batches(synthetic_samples(6), 3)), rank=2, progress=False,
                              max_memory=layer_budget)
    assert init.passes == len(earlier) == 3


RELEASE_SCRIPT = r"""
import json, torch
import lora_da
from lora_da import pipeline
from lora_da.memory_peaks import current_rss
from lora_da.models import tiny_llama, batches
torch.set_num_threads(1)
model = tiny_llama(hidden_size=256, intermediate_size=512, num_layers=4, vocab_size=4096).eval()
g = torch.Generator().manual_seed(0)
samples = [{"input_ids": (ids := torch.randint(3, 4096, (512,), generator=g)), "labels": ids.clone()} for _ in range(16)]
seen = {}
real = pipeline.solve_pass
def spy(method, context, model, config):
    seen["at_solve"] = current_rss()
    return real(method, context, model, config)
pipeline.solve_pass = spy
start = current_rss()
init = lora_da.initialize(model, list(batches(samples, 8)), rank=2, progress=False, train_size=16)
print(json.dumps({"start": start, "at_solve": seen["at_solve"], "statistics": init.statistics_bytes,
                  "pass_peak": init.memory.statistics_pass}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_the_freed_activations_are_handed_back_before_the_solve():
    """A batch's activations (here ~0.5 GB: 8 x 512 tokens, vocab 4096) are freed in chunks that
    glibc keeps resident; the driver hands them back after the statistics pass, so the solve
    starts from about model + statistics, not from the pass's peak (fresh process)."""
    import json
    import subprocess

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    done = subprocess.run([sys.executable, "-c", RELEASE_SCRIPT], capture_output=True, text=True, env=env,
                          check=True, timeout=300)
    numbers = json.loads(done.stdout.strip().splitlines()[-1])
    assert numbers["pass_peak"] - numbers["start"] > 300 * 2**20  # the activations were there
    assert numbers["at_solve"] - numbers["start"] <= numbers["statistics"] + 120 * 2**20, numbers
