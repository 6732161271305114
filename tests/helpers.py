"""Small models, data and checks shared by the tests."""

from __future__ import annotations

import torch
from torch import nn


class SharedInputMLP(nn.Module):
    """``y = fc2(tanh(fc1a(x) + fc1b(x)))``: fc1a and fc1b share one input tensor."""

    def __init__(self, d_in: int = 6, d_hidden: int = 7, d_out: int = 5, seed: int = 0, dtype=torch.float64):
        super().__init__()
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        self.fc1a = nn.Linear(d_in, d_hidden)
        self.fc1b = nn.Linear(d_in, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_out)
        torch.random.set_rng_state(generator_state)
        self.to(dtype)

    def hidden(self, x):
        return torch.tanh(self.fc1a(x) + self.fc1b(x))

    def forward(self, x):
        return self.fc2(self.hidden(x))


def regression_batches(num_samples=10, seq_len=5, d_in=6, d_out=5, batch_size=3, seed=0, dtype=torch.float64):
    """Token-level regression data with holes in the attention mask (one sample fully masked)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(num_samples, seq_len, d_in, generator=generator, dtype=dtype)
    target = torch.randn(num_samples, seq_len, d_out, generator=generator, dtype=dtype)
    mask = (torch.rand(num_samples, seq_len, generator=generator) > 0.3).long()
    mask[0, :] = 1
    mask[1, :] = 0  # a sample with no valid token: carries no loss
    return [
        {"x": x[i : i + batch_size], "target": target[i : i + batch_size], "attention_mask": mask[i : i + batch_size]}
        for i in range(0, num_samples, batch_size)
    ]


def regression_loss(model, batch):
    """Per-sample mean over valid tokens of ``0.5‖out − target‖²``; samples without tokens dropped."""
    out = model(batch["x"])
    mask = batch["attention_mask"].bool()
    token_loss = (0.5 * (out - batch["target"]) ** 2).sum(-1).masked_fill(~mask, 0.0)
    counts = mask.sum(1)
    per_sample = token_loss.sum(1) / counts.clamp(min=1)
    return per_sample[counts > 0]


def model_fingerprint(model: nn.Module) -> dict:
    """Everything initialize() promises to leave as found."""
    return {
        "training": [(name, m.training) for name, m in model.named_modules()],
        "requires_grad": [(name, p.requires_grad) for name, p in model.named_parameters()],
        "grads": [(name, p.grad is None) for name, p in model.named_parameters()],
        "hooks": [
            (
                name,
                len(m._forward_hooks),
                len(m._forward_pre_hooks),
                len(m._backward_hooks),
                len(getattr(m, "_backward_pre_hooks", {})),
            )
            for name, m in model.named_modules()
        ],
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
    }


def assert_same_fingerprint(before: dict, after: dict) -> None:
    for key in ("training", "requires_grad", "grads", "hooks"):
        assert before[key] == after[key], key
    assert before["state"].keys() == after["state"].keys()
    for k in before["state"]:
        assert torch.equal(before["state"][k], after["state"][k]), k


def principal_angle(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest principal angle (radians) between the column spaces of a and b."""
    qa, _ = torch.linalg.qr(a.to(torch.float64))
    qb, _ = torch.linalg.qr(b.to(torch.float64))
    cosines = torch.linalg.svdvals(qa.T @ qb).clamp(max=1.0)
    return float(torch.arccos(cosines.min()))


def oracle_statistics(model: SharedInputMLP, loader):
    """G (mean over samples of per-sample gradients), Z and y (means over valid tokens)."""
    W1a, W1b, W2 = model.fc1a.weight, model.fc1b.weight, model.fc2.weight
    d_in, d_hidden = W1a.shape[1], W1a.shape[0]
    Z1 = torch.zeros(d_in, d_in, dtype=torch.float64)
    Z2 = torch.zeros(d_hidden, d_hidden, dtype=torch.float64)
    y = {name: torch.zeros(W.shape[0], dtype=torch.float64) for name, W in (("fc1a", W1a), ("fc1b", W1b), ("fc2", W2))}
    G = {name: torch.zeros_like(W) for name, W in (("fc1a", W1a), ("fc1b", W1b), ("fc2", W2))}
    tokens = samples = 0
    with torch.no_grad():
        for batch in loader:
            for i in range(batch["x"].shape[0]):
                valid = [t for t in range(batch["x"].shape[1]) if batch["attention_mask"][i, t] == 1]
                if not valid:
                    continue
                samples += 1
                for t in valid:
                    x = batch["x"][i, t]
                    pre = model.fc1a(x) + model.fc1b(x)
                    h = torch.tanh(pre)
                    out = model.fc2(h)
                    g_out = (out - batch["target"][i, t]) / len(valid)  # d ℓ_i / d out_t
                    g_pre = (W2.T @ g_out) * (1 - h**2)  # d ℓ_i / d (fc1a(x)) = d ℓ_i / d (fc1b(x))
                    tokens += 1
                    Z1 += torch.outer(x, x)
                    Z2 += torch.outer(h, h)
                    y["fc1a"] += g_pre**2
                    y["fc1b"] += g_pre**2
                    y["fc2"] += g_out**2
                    G["fc1a"] += torch.outer(g_pre, x)
                    G["fc1b"] += torch.outer(g_pre, x)
                    G["fc2"] += torch.outer(g_out, h)
    Z = {"fc1a": Z1 / tokens, "fc1b": Z1 / tokens, "fc2": Z2 / tokens}
    return {k: v / samples for k, v in G.items()}, Z, {k: v / tokens for k, v in y.items()}, samples, tokens


# -- a tiny Llama and its calibration data (tests of the methods, PEFT and the pipeline) --

METHOD_RANK = 4
NO_DATA_METHODS = ("lora", "pissa", "milora")
DATA_METHODS = ("lora-da", "lora-ga", "lora-one", "cntlora", "fisher-subspace")
ALL_METHODS = ("lora-da", "lora", "pissa", "milora", "lora-ga", "lora-one", "cntlora", "fisher-subspace")


def calibration_batches():
    """8 synthetic samples in 2 padded batches of 4 (the `data` fixture of conftest.py)."""
    from lora_da.models import batches, synthetic_samples

    return list(batches(synthetic_samples(8, seed=7), 4))


def tiny64():
    from lora_da.models import tiny_llama

    return tiny_llama(dtype=torch.float64)


def run_method(method, data, model=None, **kwargs):
    """``initialize(..., method=method)`` on a float64 tiny Llama (no loader for the no-data methods)."""
    import lora_da

    model = model if model is not None else tiny64()
    loader = None if method in NO_DATA_METHODS else data
    return lora_da.initialize(
        model, loader, rank=kwargs.pop("rank", METHOD_RANK), progress=False, method=method, **kwargs
    )


def llama_autograd_statistics(data):
    """G, Z (undamped) and y of every Linear of the float64 tiny Llama, by autograd on the model's own
    outputs (no lora_da code): G = mean over samples of ∇W(sample mean token loss), Z and y over valid
    tokens; and the weights W. Returns (G, Z, y, W), dicts by module name."""
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
    """``s·B·A`` of a ModuleInit in float64."""
    return scaling * module_init.lora_B.double() @ module_init.lora_A.double()


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def weight_svd_reference(W, rank, minor):
    """PiSSA (top r) / MiLoRA (bottom r) oracle: ``(U_r S_r V_rᵀ, U_r)`` of W by torch.linalg.svd."""
    u, s, vh = torch.linalg.svd(W, full_matrices=False)
    index = slice(len(s) - rank, len(s)) if minor else slice(0, rank)
    return u[:, index] @ torch.diag(s[index]) @ vh[index], u[:, index]


def assert_equal_inits(a, b):
    assert a.modules.keys() == b.modules.keys()
    for name, m in a.modules.items():
        assert torch.equal(m.lora_A, b.modules[name].lora_A), name
        assert torch.equal(m.lora_B, b.modules[name].lora_B), name


def tiny_gpt2(n_layer: int = 2):
    """A random GPT-2 (Conv1D layers) with 128 tokens, width 32."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=128, n_positions=64, n_embd=32, n_layer=n_layer, n_head=4)).eval()


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


# -- LoRA-DA's float64 oracle (docs/math.md steps 1-7 with explicit inverses and dense eigh) --


def lora_da_oracle_factors(G, Z, y, *, rank, alpha, beta, gamma, damping, train_size):
    """Steps 1-7 with explicit inverses and dense eigh: (lora_A, lora_B, eigenvalues, σ)."""
    import math

    eye = torch.eye(Z.shape[0], dtype=torch.float64)
    Z_damped = Z + damping * eye
    Z_inv = torch.linalg.inv(Z_damped)
    delta = -Z_inv @ G.T @ torch.diag(1.0 / (y + damping))
    sigma = torch.linalg.svdvals(delta)[0]
    delta_hat = delta / sigma
    c = (1.0 / (y + damping)).sum() / train_size / sigma**2
    omega = -alpha * delta_hat @ delta_hat.T + beta * c * Z_inv
    values, vectors = torch.linalg.eigh(omega)
    A0 = vectors[:, :rank]
    for j in range(rank):  # sign: largest-magnitude entry positive
        k = int(A0[:, j].abs().argmax())
        if A0[k, j] < 0:
            A0[:, j] = -A0[:, j]
    B0 = A0.T @ delta_hat
    return A0.T / math.sqrt(gamma), B0.T / math.sqrt(gamma), values[:rank], float(sigma)


def rel_err(a, b):
    return float((a - b).norm() / b.norm())
