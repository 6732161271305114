"""initialize(..., method=...): the other initializations, each against an
independent float64 recomputation (autograd + torch.linalg) on tiny models."""

import math

import lora_da
import pytest
import torch
from helpers import (
    SharedInputMLP,
    assert_same_fingerprint,
    model_fingerprint,
    oracle_statistics,
    principal_angle,
    regression_batches,
    regression_loss,
)
from lora_da.models import batches, synthetic_samples, tiny_llama
from lora_da.peft_glue import get_peft_model_with_init, load_init_adapter
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

pytestmark = pytest.mark.filterwarnings("ignore:train_size not given")

RANK = 4
F64 = torch.float64


@pytest.fixture(scope="module")
def data():
    return list(batches(synthetic_samples(8, seed=7), 4))


def tiny64():
    return tiny_llama(dtype=F64)


def run(method, data, model=None, **kwargs):
    model = model if model is not None else tiny64()
    loader = None if method in ("lora", "pissa", "milora") else data
    return lora_da.initialize(model, loader, rank=kwargs.pop("rank", RANK), progress=False, method=method, **kwargs)


@pytest.fixture(scope="module")
def oracle(data):
    """G, Z (undamped) and y of every Linear of the float64 tiny Llama, by autograd on the model's own
    outputs (no lora_da code): G = mean over samples of ∇W(sample mean token loss), Z and y over valid tokens."""
    model = tiny64()
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    G = {n: torch.zeros_like(model.get_submodule(n).weight) for n in names}
    Z = {n: 0.0 for n in names}
    y = {n: 0.0 for n in names}
    samples = tokens = 0
    for batch in data:
        captured = {}

        def keep(name, captured=captured):
            def hook(module, args, output):
                output.retain_grad()
                captured[name] = (args[0].detach(), output)

            return hook

        handles = [model.get_submodule(n).register_forward_hook(keep(n)) for n in names]
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        for h in handles:
            h.remove()
        labels = batch["labels"][:, 1:]
        loss = nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="none"
        ).view(labels.shape)
        counts = (labels != -100).sum(1)
        (loss.sum(1) / counts.clamp(min=1))[counts > 0].sum().backward()
        samples += int((counts > 0).sum())
        mask = batch["attention_mask"].reshape(-1).bool()
        tokens += int(mask.sum())
        for n in names:
            a, out = captured[n]
            a = a.reshape(-1, a.shape[-1])
            g = out.grad.reshape(-1, out.shape[-1])
            G[n] += g.T @ a
            Z[n] = Z[n] + a[mask].T @ a[mask]
            y[n] = y[n] + (g[mask] ** 2).sum(0)
    return (
        {n: G[n] / samples for n in names},
        {n: Z[n] / tokens for n in names},
        {n: y[n] / tokens for n in names},
        {n: model.get_submodule(n).weight.detach().clone() for n in names},
    )


def product(module_init, scaling=1.0):
    return scaling * module_init.lora_B.double() @ module_init.lora_A.double()


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


# -- API --------------------------------------------------------------------------------


def test_bad_method_name_lists_the_valid_ones(data):
    with pytest.raises(ValueError, match="method must be one of 'lora-da', 'lora', 'pissa'.*'fisher-subspace'"):
        lora_da.initialize(tiny_llama(), data, method="loraga")
    with pytest.raises(ValueError, match="has no option 'gamma_s'"):
        lora_da.initialize(tiny_llama(), data, method="lora-ga", method_options={"gamma_s": 2})


def test_loader_none_only_for_methods_that_read_no_data():
    for method in ("lora-da", "lora-ga", "lora-one", "cntlora", "fisher-subspace"):
        with pytest.raises(ValueError, match=f"method '{method}' needs calibration data"):
            lora_da.initialize(tiny_llama(), None, rank=2, method=method, progress=False)


# -- no-data methods ---------------------------------------------------------------------


def test_lora_is_peft_kaiming_uniform_seeded():
    init = run("lora", None, seed=3)
    again = run("lora", None, seed=3)
    other = run("lora", None, seed=4)
    generator = torch.Generator().manual_seed(3)
    for name, m in init.modules.items():
        d_in = m.lora_A.shape[1]
        expected = torch.empty(RANK, d_in)
        nn.init.kaiming_uniform_(expected, a=math.sqrt(5), generator=generator)  # modules in order, one generator
        assert torch.equal(m.lora_A, expected), name
        assert float(m.lora_A.abs().max()) <= 1 / math.sqrt(d_in)
        assert torch.count_nonzero(m.lora_B) == 0
        assert torch.equal(again.modules[name].lora_A, m.lora_A)
        assert not torch.equal(other.modules[name].lora_A, m.lora_A)
    assert not init.modifies_base_weight


@pytest.mark.parametrize("method", ["pissa", "milora"])
def test_weight_svd_methods_against_svd(method, oracle):
    *_, W = oracle
    init = run(method, None)
    for name, m in init.modules.items():
        u, s, vh = torch.linalg.svd(W[name], full_matrices=False)
        index = slice(0, RANK) if method == "pissa" else slice(len(s) - RANK, len(s))
        expected = u[:, index] @ torch.diag(s[index]) @ vh[index]
        torch.testing.assert_close(product(m), expected, rtol=1e-5, atol=1e-6)  # s = 1 factors
        assert principal_angle(m.lora_B.T.double().T, u[:, index]) < 1e-3


# -- gradient methods --------------------------------------------------------------------


def test_lora_ga_against_svd_of_g(data, oracle):
    G, *_ = oracle
    init = run("lora-ga", data)
    for name, m in init.modules.items():
        u, _, vh = torch.linalg.svd(G[name], full_matrices=False)
        assert principal_angle(m.lora_A.double().T, vh[:RANK].T) < 1e-4, name  # A from V[:, :r]
        assert principal_angle(m.lora_B.double(), u[:, RANK : 2 * RANK]) < 1e-4, name  # B from U[:, r:2r]
        scale = G[name].shape[0] ** 0.25 / math.sqrt(16.0)  # published stable scale d_out^{1/4}/√γ_s, γ_s = 16
        expected = torch.full((RANK,), scale**2, dtype=F64)
        torch.testing.assert_close(torch.linalg.svdvals(product(m))[:RANK], expected, rtol=1e-5, atol=0)
    assert init.modifies_base_weight and not init.unit_scaling_factors


def test_lora_one_against_svd_of_minus_g(data, oracle):
    G, *_ = oracle
    init = run("lora-one", data)
    for name, m in init.modules.items():
        u, s, vh = torch.linalg.svd(-G[name], full_matrices=False)
        expected = u[:, :RANK] @ torch.diag(s[:RANK]) @ vh[:RANK] / (s[0] * 64.0)
        torch.testing.assert_close(product(m), expected, rtol=1e-5, atol=1e-9)
        # balanced split: A and B carry √(S_r/S_1)/√γ_s each
        torch.testing.assert_close(torch.linalg.norm(m.lora_A.double(), dim=1), (s[:RANK] / s[0]).sqrt() / 8.0, rtol=1e-5, atol=0)
    assert not init.modifies_base_weight


def test_fisher_subspace_against_eigh_recomputation(data, oracle):
    G, Z, y, _ = oracle
    init = run("fisher-subspace", data, gamma=256.0)
    for name, m in init.modules.items():
        lam = init.modules[name].damping
        evals, evecs = torch.linalg.eigh(Z[name] + lam * torch.eye(Z[name].shape[0], dtype=F64))
        z_half, z_minus_half = (evecs * evals.sqrt()) @ evecs.T, (evecs * evals.rsqrt()) @ evecs.T
        y_minus_half = (y[name] + 1e-6).rsqrt()
        M = y_minus_half[:, None] * G[name] @ z_minus_half
        p, sig, qh = torch.linalg.svd(M, full_matrices=False)
        step = -(y_minus_half[:, None] * (p[:, :RANK] @ torch.diag(sig[:RANK]) @ qh[:RANK])) @ z_minus_half
        expected = step / (torch.linalg.matrix_norm(step, ord=2) * 256.0)
        torch.testing.assert_close(product(m), expected, rtol=1e-4, atol=1e-10)
        # the chosen directions are the Fisher-optimal rank-r step: X = Y^{1/2} ΔW Z^{1/2} = −[M]_r
        x = (y[name] + 1e-6).sqrt()[:, None] * step @ z_half
        torch.testing.assert_close(torch.linalg.svdvals(x)[:RANK], sig[:RANK], rtol=1e-6, atol=0)


def cntlora_reference(W, Z, rank, energy=0.9, shrinkage=0.1):
    """ΔW = W(T − I), T the Gaussian optimal-transport map from (0, Ẑ) to (0, D), computed in
    the other closed form T = D^{1/2} (D^{1/2} Ẑ D^{1/2})^{-1/2} D^{1/2} (the library uses
    Ẑ^{-1/2} (Ẑ^{1/2} D Ẑ^{1/2})^{1/2} Ẑ^{-1/2})."""
    d = torch.diagonal(Z)
    C = Z / torch.sqrt(torch.outer(d, d))
    C_hat = (1 - shrinkage) * C + shrinkage * torch.eye(len(d), dtype=F64)
    Z_hat = d.sqrt()[:, None] * C_hat * d.sqrt()[None, :]
    evals, evecs = torch.linalg.eigh(d.sqrt()[:, None] * Z_hat * d.sqrt()[None, :])
    M = d.sqrt()[:, None] * ((evecs * evals.rsqrt()) @ evecs.T) * d.sqrt()[None, :]
    delta = W @ (M - torch.eye(len(d), dtype=F64))
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    share = torch.cumsum(s**2, 0) / (s**2).sum()
    k = min(rank, int((share < energy).sum()) + 1)
    return u[:, :k] @ torch.diag(s[:k]) @ vh[:k], k, delta, M, d


def test_cntlora_closed_form_and_per_layer_ranks(data, oracle):
    _, Z, _, W = oracle
    init = run("cntlora", data, rank=8, method_options={"energy": 0.6})
    ranks = set()
    minimality_checked = 0  # on the modules whose W has full column rank (W⁺ recovers T)
    for name, m in init.modules.items():
        expected, k, delta, _, d = cntlora_reference(W[name], Z[name], 8, energy=0.6)
        assert m.rank == k, name
        ranks.add(k)
        torch.testing.assert_close(product(m), expected, rtol=1e-5, atol=1e-8)
        # the constraint it solves: (W+ΔW) Ẑ (W+ΔW)ᵀ = W D Wᵀ, Ẑ = D^{1/2} Ĉ D^{1/2}
        Z_hat = 0.9 * Z[name] + 0.1 * torch.diag(d)
        torch.testing.assert_close((W[name] + delta) @ Z_hat @ (W[name] + delta).T, W[name] @ torch.diag(d) @ W[name].T)
        # of all maps T with T Ẑ Tᵀ = D, this one moves the activations least: E‖(T − I)x‖², x ~ (0, Ẑ),
        # is below that of the map D^{1/2} Ĉ^{-1/2} D^{-1/2} (the earlier reading) and of D^{1/2} Q Ẑ^{-1/2}
        eye = torch.eye(len(d), dtype=F64)
        transport = eye + torch.linalg.lstsq(W[name], delta).solution if W[name].shape[0] >= W[name].shape[1] else None
        if transport is not None:
            def displacement(t):
                return float(torch.trace((t - eye) @ Z_hat @ (t - eye).T))
            evals, evecs = torch.linalg.eigh(Z_hat / torch.sqrt(torch.outer(d, d)))
            earlier = d.sqrt()[:, None] * ((evecs * evals.rsqrt()) @ evecs.T) * d.rsqrt()[None, :]
            q, _ = torch.linalg.qr(torch.randn(len(d), len(d), dtype=F64, generator=torch.Generator().manual_seed(1)))
            e2, v2 = torch.linalg.eigh(Z_hat)
            rotated = d.sqrt()[:, None] * q @ ((v2 * e2.rsqrt()) @ v2.T)
            for other in (earlier, rotated):
                torch.testing.assert_close(other @ Z_hat @ other.T, torch.diag(d))  # also a solution
                assert displacement(transport) <= displacement(other) + 1e-9
            minimality_checked += 1
    assert len(ranks) > 1  # the spectrum criterion gives per-layer ranks
    assert minimality_checked > 0
    assert init.unit_scaling_factors and not init.modifies_base_weight


# -- forward-only pass -------------------------------------------------------------------


def test_cntlora_runs_no_backward(data, monkeypatch):
    def no_backward(*args, **kwargs):
        raise AssertionError("a backward pass ran")

    monkeypatch.setattr(torch.autograd, "grad", no_backward)
    monkeypatch.setattr(torch.Tensor, "backward", no_backward)
    grad_enabled = []
    model = tiny_llama()
    handle = model.model.layers[0].mlp.down_proj.register_forward_hook(
        lambda *args: grad_enabled.append(torch.is_grad_enabled())
    )
    init = lora_da.initialize(model, data, rank=RANK, progress=False, method="cntlora")
    handle.remove()
    assert grad_enabled and not any(grad_enabled)
    assert init.num_samples == 8 and init.backends["statistics"].endswith("(forward only)")


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


# -- W-reading methods: quantized and Conv1D modules --------------------------------------


class Int8Linear(nn.Linear):
    """An int8 weight with a per-row scale (bitsandbytes-style); forward dequantizes."""

    def __init__(self, linear):
        super().__init__(linear.in_features, linear.out_features)
        scale = linear.weight.detach().abs().amax(dim=1, keepdim=True) / 127
        self.weight = nn.Parameter(torch.round(linear.weight.detach() / scale).to(torch.int8), requires_grad=False)
        self.register_buffer("scale", scale)

    def forward(self, x):
        return nn.functional.linear(x, self.weight.to(self.scale.dtype) * self.scale, self.bias)


@pytest.mark.parametrize("method", ["pissa", "milora", "cntlora"])
def test_weight_reading_methods_refuse_an_int8_module_by_name(method):
    model = SharedInputMLP(dtype=torch.float32)
    model.fc1b = Int8Linear(model.fc1b)
    data = None if method != "cntlora" else regression_batches(dtype=torch.float32)
    with pytest.raises(TypeError, match="module 'fc1b' has a torch.int8 weight"):
        lora_da.initialize(model, data, rank=2, loss_fn=regression_loss, progress=False, method=method)


def test_conv1d_w_reading_method_uses_the_transposed_weight(data):
    from transformers import GPT2Config, GPT2LMHeadModel

    def gpt2():
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(vocab_size=128, n_positions=64, n_embd=32, n_layer=1, n_head=4)).eval()

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


# -- PEFT: offsets, per-layer ranks, the model left as found -------------------------------


@pytest.mark.parametrize("method", ["pissa", "milora", "lora-ga"])
def test_base_offset_methods_leave_the_output_unchanged(method, data, tmp_path):
    # fp32: W − s·B·A is rounded once per weight, so logits agree to ~1e-6 relative; rtol 1e-4 leaves room.
    init = lora_da.initialize(
        tiny_llama(), None if method != "lora-ga" else data, rank=RANK, progress=False, method=method
    )
    peft_model = get_peft_model_with_init(tiny_llama(), init, lora_alpha=16)
    batch = data[1]
    torch.testing.assert_close(logits(peft_model, batch), logits(tiny_llama(), batch), rtol=1e-4, atol=1e-5)
    with peft_model.disable_adapter():  # the base weights did change
        assert not torch.allclose(logits(peft_model, batch), logits(tiny_llama(), batch), rtol=1e-4, atol=1e-5)
    if method == "pissa":  # s·B·A is W's principal part whatever lora_alpha (factors ÷ √s)
        layer = dict(peft_model.named_modules())["base_model.model.model.layers.0.mlp.up_proj"]
        W = tiny_llama().get_submodule("model.layers.0.mlp.up_proj").weight.detach().double()
        u, s, vh = torch.linalg.svd(W, full_matrices=False)
        scaled = 4.0 * layer.lora_B["default"].weight.double() @ layer.lora_A["default"].weight.double()
        torch.testing.assert_close(scaled, u[:, :RANK] @ torch.diag(s[:RANK]) @ vh[:RANK], rtol=1e-5, atol=1e-6)
    # saved: the init's factors for the offset base; load_init_adapter applies the offset to the unmodified base
    init.save_pretrained(str(tmp_path), lora_alpha=16)
    loaded = load_init_adapter(tiny_llama(), str(tmp_path))
    torch.testing.assert_close(logits(loaded, batch), logits(peft_model, batch), rtol=1e-5, atol=1e-6)
    assert "offset" in init.report()["base_weight"] and "W - s*lora_B*lora_A" in init.summary()


def test_per_layer_ranks_round_trip_through_peft(data, tmp_path):
    init = lora_da.initialize(
        tiny_llama(), data, rank=8, progress=False, method="cntlora", method_options={"energy": 0.6}
    )
    assert len(set(init.ranks.values())) > 1
    applied = get_peft_model_with_init(tiny_llama(), init, lora_alpha=8)
    init.save_pretrained(str(tmp_path), lora_alpha=8)
    loaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    layers = dict(loaded.named_modules())
    for name, rank in init.ranks.items():
        layer = layers["base_model.model." + name]
        assert layer.lora_A["default"].weight.shape[0] == rank, name
        expected = product(init.modules[name])  # s·B·A = ΔW_k with s = 8/r_l per layer
        scaled = layer.scaling["default"] * layer.lora_B["default"].weight.double() @ layer.lora_A["default"].weight.double()
        torch.testing.assert_close(scaled, expected, rtol=1e-5, atol=1e-7)
    batch = data[0]
    assert torch.equal(logits(applied, batch), logits(loaded, batch))
    assert not torch.allclose(logits(loaded, batch), logits(tiny_llama(), batch))


# one method per kind of pass: none (lora; pissa reads W), forward only, full
@pytest.mark.parametrize("method", ["lora", "pissa", "cntlora", "fisher-subspace"])
def test_model_left_exactly_as_found(method, data):
    model = tiny_llama()
    model.model.layers[0].train()
    before = model_fingerprint(model)
    run(method, data, model=model)
    assert_same_fingerprint(before, model_fingerprint(model))
