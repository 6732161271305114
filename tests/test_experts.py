"""Fused MoE experts (lora_da/experts.py, expert_collector.py, expert_fallback.py): per-expert
statistics against a float64 recomputation written here, per-expert token counts, fallback,
targeting, the model left as found."""

import copy
import warnings
import json
from collections import defaultdict

import pytest
import torch
from torch import nn

import lora_da
from lora_da.models import batches, synthetic_samples
from lora_da.report import write_report
from lora_da.statistics_pass import collect_statistics
from lora_da.targets import find_target_modules

from helpers import assert_same_fingerprint, model_fingerprint

pytestmark = pytest.mark.filterwarnings("ignore:train_size not given", "ignore::lora_da.user_warnings.TargetsWarning")


def tiny_moe(family: str, *, num_experts: int = 4, seed: int = 0, dtype=torch.float64):
    """A tiny random MoE causal LM built from a config (nothing downloaded)."""
    import transformers

    common = dict(
        vocab_size=128, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        max_position_embeddings=64, pad_token_id=0, tie_word_embeddings=False,
    )
    if family == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(
            **common, head_dim=8, intermediate_size=24, moe_intermediate_size=8, num_experts=num_experts,
            num_experts_per_tok=2, decoder_sparse_step=1,
        )
        cls = transformers.Qwen3MoeForCausalLM
    elif family == "mixtral":
        config = transformers.MixtralConfig(
            **common, intermediate_size=12, num_local_experts=num_experts, num_experts_per_tok=2
        )
        cls = transformers.MixtralForCausalLM
    else:
        raise ValueError(family)
    config._experts_implementation = "eager"  # grouped_mm has no float64 kernel on CPU
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = cls(config).to(dtype)
    finally:
        torch.random.set_rng_state(state)
    return model.eval()


def data(num_samples=8, batch_size=4, seed=3):
    return list(batches(synthetic_samples(num_samples, seed=seed), batch_size))


def experts_modules(model):
    return {name: m for name, m in model.named_modules() if type(m).__name__.endswith("Experts")}


def oracle(model, loader):
    """Float64 Z_e, y_e, G_e of every expert, recomputed independently: a plain per-expert
    loop (written here) replaces each experts module's forward; output gradients come from
    zero leaves added to each projection's output; G from autograd of the fused parameters."""
    sums = defaultdict(lambda: {"z": 0.0, "y": 0.0, "tokens": 0.0})
    grads = defaultdict(lambda: 0.0)
    samples = 0
    experts = experts_modules(model)
    for batch in loader:
        mask = batch["attention_mask"].reshape(-1).to(torch.float64)
        records = []

        def make_forward(name, module):
            def forward(hidden, index, weights):
                out = torch.zeros_like(hidden)
                for e in range(module.num_experts):
                    token, slot = torch.where(index == e)
                    if token.numel() == 0:
                        continue
                    x = hidden[token]
                    leaf_h = torch.zeros(token.numel(), module.gate_up_proj.shape[1], dtype=x.dtype, requires_grad=True)
                    h = nn.functional.linear(x, module.gate_up_proj[e]) + leaf_h
                    gate, up = h.chunk(2, dim=-1)
                    u = module.act_fn(gate) * up
                    leaf_o = torch.zeros(token.numel(), module.down_proj.shape[1], dtype=x.dtype, requires_grad=True)
                    o = nn.functional.linear(u, module.down_proj[e]) + leaf_o
                    out.index_add_(0, token, o * weights[token, slot, None])
                    records.append((f"{name}.{e}.gate_up_proj", x.detach(), leaf_h, token))
                    records.append((f"{name}.{e}.down_proj", u.detach(), leaf_o, token))
                return out

            return forward

        for name, module in experts.items():
            module.forward = make_forward(name, module)
        try:
            losses = lora_da.losses.causal_lm_per_sample_loss(model, batch)
            params = [p for m in experts.values() for p in (m.gate_up_proj, m.down_proj)]
            leaves = [r[2] for r in records]
            out = torch.autograd.grad(losses.sum(), params + leaves)
        finally:
            for module in experts.values():
                del module.forward
        samples += losses.numel()
        param_grads, leaf_grads = out[: len(params)], out[len(params) :]
        for i, (name, module) in enumerate(experts.items()):
            for e in range(module.num_experts):
                grads[f"{name}.{e}.gate_up_proj"] = grads[f"{name}.{e}.gate_up_proj"] + param_grads[2 * i][e]
                grads[f"{name}.{e}.down_proj"] = grads[f"{name}.{e}.down_proj"] + param_grads[2 * i + 1][e]
        for (name, x, _, token), g in zip(records, leaf_grads):
            m = mask[token]
            entry = sums[name]
            entry["z"] = entry["z"] + (x * m[:, None]).T @ x
            entry["y"] = entry["y"] + (g * g * m[:, None]).sum(0)
            entry["tokens"] += float(m.sum())
    return {
        name: {
            "Z": entry["z"] / entry["tokens"],
            "y": entry["y"] / entry["tokens"],
            "G": grads[name] / samples,
            "tokens": entry["tokens"],
        }
        for name, entry in sums.items()
    }


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_per_expert_statistics_match_float64_recomputation(family):
    model = tiny_moe(family)
    loader = data()
    targets = find_target_modules(model, ["experts"], rank=2)
    assert len(targets) == 2 * 2 * 4  # 2 layers x 2 fused parameters x 4 experts
    before = model_fingerprint(model)
    stats = collect_statistics(model, loader, targets)
    assert_same_fingerprint(before, model_fingerprint(model))
    assert all("forward" not in m.__dict__ for m in model.modules())  # the capturing forwards are gone
    truth = oracle(model, loader)
    assert set(truth) <= set(targets)
    counts = []
    for name, expected in truth.items():
        # float64 throughout: only summation order differs
        torch.testing.assert_close(stats.input_factor(name), expected["Z"], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(stats.output_factor_diag(name), expected["y"], rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(stats.gradient(name), expected["G"], rtol=1e-10, atol=1e-14)
        assert stats.tokens(name) == expected["tokens"]
        counts.append(expected["tokens"])
    assert len(set(counts)) > 1 and max(counts) < stats.num_tokens  # each expert its own count, not the pass's


def test_unrouted_expert_gets_the_fallback_and_is_counted(tmp_path):
    model = tiny_moe("qwen3_moe", num_experts=8)
    router = model.model.layers[0].mlp.gate

    def routing(hidden):  # Qwen3-MoE's routing; layer 0: expert 5 never chosen, expert 6 by the first token only
        logits = nn.functional.linear(hidden.reshape(-1, router.hidden_dim), router.weight)
        logits[:, 5] = float("-inf")
        logits[1:, 6] = float("-inf")
        logits[0, 6] = logits[0, :5].max() + 5.0
        top, index = torch.topk(torch.softmax(logits, dim=-1), router.top_k, dim=-1)
        return logits, top / top.sum(-1, keepdim=True), index

    router.forward = routing
    loader = data()  # 2 batches: expert 6 gets 2 kept tokens, fewer than rank 3
    init = lora_da.initialize(model, loader, rank=3, target_modules=["experts"], progress=False)
    stats = collect_statistics(model, loader, find_target_modules(model, ["experts"], rank=3))
    unrouted = {"model.layers.0.mlp.experts.5.gate_up_proj", "model.layers.0.mlp.experts.5.down_proj"}
    sparse = {"model.layers.0.mlp.experts.6.gate_up_proj", "model.layers.0.mlp.experts.6.down_proj"}
    assert unrouted.isdisjoint(stats.modules)
    assert all(stats.tokens(n) == 2 for n in sparse)
    assert set(init.expert_fallbacks) == unrouted | sparse | {n for n in stats.modules if stats.tokens(n) < 3}
    assert init.report()["expert_fallbacks"] == init.expert_fallbacks
    for name in init.expert_fallbacks:
        assert torch.count_nonzero(init.modules[name].lora_B) == 0  # PEFT's default: B = 0
        assert torch.count_nonzero(init.modules[name].lora_A) > 0
    solved = [n for n in init.modules if n not in init.expert_fallbacks]
    assert solved and all(torch.count_nonzero(init.modules[n].lora_B) > 0 for n in solved)
    assert f"{len(init.expert_fallbacks)} experts with fewer than rank" in init.summary()
    write_report(init, str(tmp_path), visual=False)  # fallbacks have no eigenvalues of Ω
    assert json.loads((tmp_path / "lora_da_report.json").read_text())["expert_fallbacks"] == init.expert_fallbacks


def test_batched_solve_of_experts_matches_dense_oracle():
    model = tiny_moe("mixtral")
    loader = data()
    fast = lora_da.initialize(model, loader, rank=2, progress=False)
    dense = lora_da.initialize(model, loader, rank=2, solver="eigh", progress=False)
    experts = [n for n in fast.experts if n not in fast.expert_fallbacks]
    assert experts
    for name in experts:
        a, b = fast.modules[name], dense.modules[name]
        # B·A is sign-free; LOBPCG answers are checked to 1e-6-ish residuals
        torch.testing.assert_close(a.lora_B @ a.lora_A, b.lora_B @ b.lora_A, rtol=1e-3, atol=1e-5)


def test_default_targets_cover_experts_and_name_the_routers():
    model = tiny_moe("qwen3_moe")
    with pytest.warns(lora_da.user_warnings.TargetsWarning, match=r"routers: 'model\.layers\.\*\.mlp\.gate' \(2\)") as record:
        targets = find_target_modules(model, None, rank=2)
    assert len(record) == 1
    assert "model.layers.1.mlp.experts.3.down_proj" in targets
    assert "model.layers.0.self_attn.q_proj" in targets and "lm_head" not in targets


def test_naming_experts_explicitly():
    model = tiny_moe("qwen3_moe")
    only_down = find_target_modules(model, ["experts.down_proj"], rank=2)
    assert sorted(only_down) == sorted(f"model.layers.{l}.mlp.experts.{e}.down_proj" for l in range(2) for e in range(4))
    regex = find_target_modules(model, r"model\.layers\.0\.mlp\.experts\.gate_up_proj", rank=2)
    assert len(regex) == 4
    with pytest.raises(ValueError, match=r"rank=9 exceeds min\(d_in, d_out\)=8 of module 'model\.layers\.0\.mlp\.experts\.0\.down_proj'"):
        find_target_modules(model, ["experts"], rank=9)
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp\.gate' is a Qwen3MoeTopKRouter, not an nn\.Linear"):
        find_target_modules(model, ["mlp.gate"], rank=2)


def test_experts_of_another_layout_are_refused_by_name():
    model = tiny_moe("qwen3_moe")
    experts = model.model.layers[0].mlp.experts
    experts.has_gate = "yes"  # not transformers' layout flags any more
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp\.experts' is a Qwen3MoeExperts: an experts layout"):
        find_target_modules(model, ["experts"], rank=2)
    with pytest.warns(lora_da.user_warnings.TargetsWarning, match=r"experts of a layout lora-da cannot read: 'model\.layers\.0\.mlp\.experts'"):
        targets = find_target_modules(model, None, rank=2)
    assert not any(n.startswith("model.layers.0.mlp.experts") for n in targets)


def test_a_computation_lora_da_does_not_reproduce_is_refused():
    model = tiny_moe("qwen3_moe")
    experts = model.model.layers[1].mlp.experts
    original = type(experts).forward
    type_name = type(experts).__name__

    def other_forward(self, hidden, index, weights):  # not the fused-experts computation
        return 2.0 * original(self, hidden, index, weights)

    experts.forward = other_forward.__get__(experts)
    before = model_fingerprint(model)
    with pytest.raises(ValueError, match=rf"'model\.layers\.1\.mlp\.experts' \({type_name}\) computes something other"):
        lora_da.initialize(model, data(), rank=2, target_modules=["experts"], progress=False)
    assert_same_fingerprint(before, model_fingerprint(model))
    assert experts.__dict__["forward"].__func__ is other_forward  # the user's own forward is back


def test_experts_and_stats_checkpoint_are_refused(tmp_path):
    with pytest.raises(ValueError, match="stats_checkpoint is not supported with MoE expert targets"):
        lora_da.initialize(
            tiny_moe("qwen3_moe"), data(), rank=2, target_modules=["experts"], progress=False,
            stats_checkpoint=str(tmp_path / "s.ckpt"),
        )


def test_cntlora_refuses_experts_before_any_pass():
    with pytest.raises(ValueError, match=r"cntlora picks a rank per module, but the experts .*'model\.layers\.0\.mlp\.experts\.0\.gate_up_proj'"):
        lora_da.initialize(tiny_moe("qwen3_moe"), iter(()), rank=2, method="cntlora", target_modules=["experts"])


@pytest.mark.parametrize("method", ["lora-ga", "lora-one", "fisher-subspace"])
def test_other_data_methods_serve_experts(method):
    init = lora_da.initialize(tiny_moe("qwen3_moe"), data(), rank=2, method=method, target_modules=["experts"], progress=False)
    solved = [n for n in init.experts if n not in init.expert_fallbacks]
    assert solved and all(torch.isfinite(init.modules[n].lora_A).all() for n in solved)


def test_grouped_mm_model_gives_the_statistics_of_the_eager_one():
    eager = tiny_moe("qwen3_moe", dtype=torch.float32)
    grouped = copy.deepcopy(eager)
    for module in experts_modules(grouped).values():
        module.config = copy.copy(module.config)
        module.config._experts_implementation = "grouped_mm"  # transformers' default on CPU float32
    loader = data()
    targets = lambda m: find_target_modules(m, ["experts"], rank=2)  # noqa: E731
    a, b = collect_statistics(eager, loader, targets(eager)), collect_statistics(grouped, loader, targets(grouped))
    assert set(a.modules) == set(b.modules)
    for name in a.modules:  # the same captured loop runs in both: equal sums
        torch.testing.assert_close(b.input_factor(name), a.input_factor(name), rtol=0, atol=0)
        torch.testing.assert_close(b.gradient(name), a.gradient(name), rtol=0, atol=0)


def test_experts_split_over_passes_by_max_memory_give_the_same_init():
    model = tiny_moe("qwen3_moe")
    loader = data()
    whole = lora_da.initialize(model, loader, rank=2, target_modules=["experts"], solver="eigh", progress=False)
    split = lora_da.initialize(model, loader, rank=2, target_modules=["experts"], solver="eigh", progress=False,
                               max_memory=19000)  # bytes: one expert's solve reserve (10 KiB) + about two experts' statistics per pass
    assert split.passes > 4 and split.expert_fallbacks == whole.expert_fallbacks
    for name, m in whole.modules.items():
        torch.testing.assert_close(split.modules[name].lora_B @ split.modules[name].lora_A, m.lora_B @ m.lora_A,
                                   rtol=1e-9, atol=1e-12)


def test_offloaded_experts_are_refused_by_name():
    model = tiny_moe("qwen3_moe", dtype=torch.float32)
    experts = model.model.layers[1].mlp.experts
    experts.down_proj = nn.Parameter(torch.empty_like(experts.down_proj, device="meta"))
    with pytest.raises(ValueError, match=r"experts 'model\.layers\.1\.mlp\.experts\.down_proj' are on the meta device"):
        lora_da.initialize(model, data(), rank=2, target_modules=["experts"], progress=False)


def test_experts_whose_mask_keeps_no_token_get_the_fallback_not_an_error():
    """A per-module mask that keeps none of an experts module's tokens: its experts count 0
    tokens (each its own count) and get PEFT's default init; the other targets are solved."""
    model = tiny_moe("qwen3_moe")
    layer0 = "model.layers.0.mlp.experts"

    def token_mask(batch, name):
        mask = batch["attention_mask"]
        return torch.zeros_like(mask) if name.startswith(layer0 + ".") else mask

    init = lora_da.initialize(model, data(), rank=2, target_modules=["experts", "q_proj"], token_mask=token_mask,
                              progress=False)
    zero = {n for n in init.experts if n.startswith(layer0 + ".")}
    assert zero and zero <= set(init.expert_fallbacks)
    assert any(n.startswith("model.layers.1.mlp.experts.") and n not in init.expert_fallbacks for n in init.experts)
    assert all(float(init.modules[n].lora_B.abs().max()) == 0.0 for n in zero)


def test_cli_compute_init_warns_about_left_out_targets_once():
    """``lora-da init`` looks at the targets before ``initialize`` does (for the report's extra
    eigenvalues): the warning about the routers left out comes once, from ``initialize``."""
    import argparse

    from lora_da.cli.init import compute_init

    model = tiny_moe("qwen3_moe")
    args = argparse.Namespace(
        method="lora-da", rank=2, report_eigenvalues=2, target_modules=None, alpha=1.0, beta=0.03, gamma=1024.0,
        damping=1e-6, token_mask="attention", seed=0,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        init = compute_init(model, data(), args, train_size=8, progress=False)
    targets_warnings = [w for w in caught if issubclass(w.category, lora_da.user_warnings.TargetsWarning)]
    assert len(targets_warnings) == 1, [str(w.message) for w in targets_warnings]
    assert "routers" in str(targets_warnings[0].message)
    assert next(iter(init.modules.values())).lora_A.shape[0] == 2


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated")
def test_experts_inside_checkpointed_layers_are_refused_by_name():
    """Activation checkpointing recomputes the routing in the backward, which the pass does not
    follow for experts: refused before any work, naming an expert, the model left as found."""
    model = tiny_moe("qwen3_moe")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    before = model_fingerprint(model)
    with pytest.raises(ValueError, match=r"MoE experts 'model\.layers\.0\.mlp\.experts' run inside an activation-checkpointed layer"):
        lora_da.initialize(model, data(), rank=2, train_size=8, progress=False)
    assert_same_fingerprint(before, model_fingerprint(model))
    assert model.training and model.is_gradient_checkpointing
