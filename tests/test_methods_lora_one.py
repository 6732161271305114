"""``method="lora-one"`` (lora_da/methods/lora_one.py): one best-rank-r step along −G, against an autograd G."""

import pytest
import torch

from helpers import METHOD_RANK as RANK
from helpers import product
from helpers import run_method as run

pytestmark = pytest.mark.filterwarnings("ignore:train_size not given")


def test_lora_one_against_svd_of_minus_g(data, llama_oracle):
    G, *_ = llama_oracle
    init = run("lora-one", data)
    for name, m in init.modules.items():
        u, s, vh = torch.linalg.svd(-G[name], full_matrices=False)
        expected = u[:, :RANK] @ torch.diag(s[:RANK]) @ vh[:RANK] / (s[0] * 64.0)
        torch.testing.assert_close(product(m), expected, rtol=1e-5, atol=1e-9)
        # balanced split: A and B carry √(S_r/S_1)/√γ_s each
        torch.testing.assert_close(torch.linalg.norm(m.lora_A.double(), dim=1), (s[:RANK] / s[0]).sqrt() / 8.0, rtol=1e-5, atol=0)
    assert not init.modifies_base_weight
