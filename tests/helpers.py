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
