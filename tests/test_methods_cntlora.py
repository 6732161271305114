"""``method="cntlora"`` (lora_da/methods/cntlora.py): the closed form against a second closed form
(autograd statistics), the constraint it solves, its minimality, per-layer ranks, and no backward pass."""

import lora_da
import pytest
import torch
from lora_da.models import tiny_llama

from helpers import METHOD_RANK as RANK
from helpers import product
from helpers import run_method as run

pytestmark = pytest.mark.filterwarnings("ignore:train_size not given")

F64 = torch.float64


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


def test_cntlora_closed_form_and_per_layer_ranks(data, llama_oracle):
    _, Z, _, W = llama_oracle
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
