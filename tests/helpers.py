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
