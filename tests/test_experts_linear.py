"""nn.Linear experts in a container (SwitchTransformers): an expert that got no token in a batch
contributes nothing, and each expert's Z and y are normalized by its own routed, kept tokens
(lora_da/expert_collector.py LinearExpertRouting), against a float64 recomputation written here."""

from collections import defaultdict

import pytest
import torch
from torch import nn

import lora_da
from lora_da.statistics_pass import collect_statistics
from lora_da.targets import find_target_modules

from helpers import assert_same_fingerprint, model_fingerprint

pytestmark = pytest.mark.filterwarnings("ignore:train_size not given", "ignore::lora_da.user_warnings.TargetsWarning")

ENCODER_EXPERTS = r"encoder\..*\.experts\.expert_\d+\.w[io]"


def tiny_switch(num_experts=4):
    from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

    config = SwitchTransformersConfig(
        vocab_size=64, d_model=16, d_kv=8, d_ff=12, num_layers=2, num_decoder_layers=1, num_heads=2,
        num_experts=num_experts, expert_capacity=64, encoder_sparse_step=1, decoder_sparse_step=1,
        decoder_start_token_id=0, pad_token_id=0,
    )
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        return SwitchTransformersForConditionalGeneration(config).to(torch.float64).eval()
    finally:
        torch.random.set_rng_state(state)


def switch_batches(num=6, batch_size=3, seq=6, seed=1):
    generator = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, num, batch_size):
        ids = torch.randint(1, 64, (batch_size, seq), generator=generator)
        mask = torch.ones_like(ids)
        mask[0, 4:] = 0  # padding: routed, but not counted
        out.append({"input_ids": ids, "attention_mask": mask, "labels": torch.randint(1, 64, (batch_size, 3), generator=generator)})
    return out


def seq2seq_loss(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).logits
    return nn.functional.cross_entropy(logits.transpose(1, 2), batch["labels"], reduction="none").mean(1)


def oracle(model, loader, names):
    """Float64 per-expert Z, y (kept routed tokens only) and G (autograd of the expert weights)."""
    containers = {n: m for n, m in model.named_modules() if type(m).__name__ == "SwitchTransformersExperts"}
    containers = {n: m for n, m in containers.items() if n.startswith("encoder.")}
    sums = defaultdict(lambda: {"z": 0.0, "y": 0.0, "tokens": 0.0})
    grads = defaultdict(lambda: 0.0)
    samples = 0
    for batch in loader:
        mask = batch["attention_mask"].reshape(-1).to(torch.float64)
        records = []

        def make_forward(name, container):
            def forward(hidden, selected, weights):
                out = torch.zeros_like(hidden)
                for e in range(container.num_experts):
                    token = torch.where(selected[:, 0, e] != 0)[0]
                    if token.numel() == 0:
                        continue
                    expert = container[f"expert_{e}"]
                    x = hidden[token]
                    leaf_i = torch.zeros(token.numel(), expert.wi.out_features, dtype=x.dtype, requires_grad=True)
                    u = expert.act(expert.wi(x) + leaf_i)
                    leaf_o = torch.zeros(token.numel(), expert.wo.out_features, dtype=x.dtype, requires_grad=True)
                    o = expert.wo(u) + leaf_o
                    out.index_add_(0, token, o * weights[token])
                    records.append((f"{name}.expert_{e}.wi", x.detach(), leaf_i, token))
                    records.append((f"{name}.expert_{e}.wo", u.detach(), leaf_o, token))
                return out

            return forward

        for name, container in containers.items():
            container.forward = make_forward(name, container)
        try:
            losses = seq2seq_loss(model, batch)
            params = [model.get_submodule(n).weight for n in names]
            out = torch.autograd.grad(losses.sum(), params + [r[2] for r in records], allow_unused=True)
        finally:
            for container in containers.values():
                del container.forward
        samples += losses.numel()
        for n, g in zip(names, out[: len(names)]):
            grads[n] = grads[n] + (g if g is not None else 0.0)
        for (n, x, _, token), g in zip(records, out[len(names) :]):
            m = mask[token]
            sums[n]["z"] = sums[n]["z"] + (x * m[:, None]).T @ x
            sums[n]["y"] = sums[n]["y"] + (g * g * m[:, None]).sum(0)
            sums[n]["tokens"] += float(m.sum())
    return {n: {"Z": e["z"] / e["tokens"], "y": e["y"] / e["tokens"], "G": grads[n] / samples, "tokens": e["tokens"]}
            for n, e in sums.items()}


def test_linear_experts_statistics_match_float64_recomputation():
    model = tiny_switch()
    loader = switch_batches()
    seq2seq_loss(model, loader[0])  # the router casts its classifier on the first call: fingerprint after it
    targets = find_target_modules(model, ENCODER_EXPERTS, rank=2)
    assert len(targets) == 2 * 4 * 2
    before = model_fingerprint(model)
    stats = collect_statistics(model, loader, targets, loss_fn=seq2seq_loss)
    assert_same_fingerprint(before, model_fingerprint(model))
    truth = oracle(model, loader, list(targets))
    assert truth and set(truth) <= set(targets)
    for name, expected in truth.items():
        assert stats.tokens(name) == expected["tokens"]
        if expected["tokens"] == 0:
            continue
        torch.testing.assert_close(stats.input_factor(name), expected["Z"], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(stats.output_factor_diag(name), expected["y"], rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(stats.gradient(name), expected["G"], rtol=1e-10, atol=1e-14)
    assert len({e["tokens"] for e in truth.values()}) > 1


def test_an_expert_no_token_reaches_gets_the_fallback():
    model = tiny_switch()
    router = model.encoder.block[0].layer[1].mlp.router
    original = router.forward

    def without_two(hidden):  # expert 2 of the first encoder block gets no token (as if over capacity)
        index, probs, logits = original(hidden)
        index = index.clone()
        index[..., 2] = 0
        return index, probs, logits

    router.forward = without_two
    loader = switch_batches()
    init = lora_da.initialize(model, loader, rank=2, target_modules=ENCODER_EXPERTS, loss_fn=seq2seq_loss, progress=False)
    prefix = "encoder.block.0.layer.1.mlp.experts.expert_2."
    assert {prefix + "wi", prefix + "wo"} <= set(init.expert_fallbacks)
    assert all(torch.count_nonzero(init.modules[n].lora_B) == 0 for n in init.expert_fallbacks)
    assert len(init.expert_fallbacks) < len(init.modules)


def test_default_targets_of_switch_name_the_router_linears():
    from lora_da.user_warnings import TargetsWarning

    with pytest.warns(TargetsWarning, match=r"routers: 'encoder\.block\.\*\.layer\.\*\.mlp\.router\.classifier' \(2\), 'decoder\.block\.0\.layer\.2\.mlp\.router\.classifier'"):
        targets = find_target_modules(tiny_switch(), None, rank=2)
    assert "encoder.block.0.layer.1.mlp.experts.expert_3.wo" in targets
    assert not any(".router." in name for name in targets)
