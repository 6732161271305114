"""``method="lora-ga"`` (lora_da/methods/lora_ga.py): singular vectors of G, against an autograd G."""

import math

import pytest
import torch

from helpers import METHOD_RANK as RANK
from helpers import principal_angle, product
from helpers import run_method as run

pytestmark = pytest.mark.filterwarnings("ignore:train_size not given")

F64 = torch.float64


def test_lora_ga_against_svd_of_g(data, llama_oracle):
    G, *_ = llama_oracle
    init = run("lora-ga", data)
    for name, m in init.modules.items():
        u, _, vh = torch.linalg.svd(G[name], full_matrices=False)
        assert principal_angle(m.lora_A.double().T, vh[:RANK].T) < 1e-4, name  # A from V[:, :r]
        assert principal_angle(m.lora_B.double(), u[:, RANK : 2 * RANK]) < 1e-4, name  # B from U[:, r:2r]
        scale = G[name].shape[0] ** 0.25 / math.sqrt(16.0)  # published stable scale d_out^{1/4}/√γ_s, γ_s = 16
        expected = torch.full((RANK,), scale**2, dtype=F64)
        torch.testing.assert_close(torch.linalg.svdvals(product(m))[:RANK], expected, rtol=1e-5, atol=0)
    assert init.modifies_base_weight and not init.unit_scaling_factors
