"""``method="pissa"`` (lora_da/methods/pissa.py): the top-r singular part of W, against torch.linalg.svd."""

import torch

from helpers import METHOD_RANK as RANK
from helpers import principal_angle, product, weight_svd_reference
from helpers import run_method as run


def test_pissa_against_svd(llama_oracle):
    *_, W = llama_oracle
    init = run("pissa", None)
    for name, m in init.modules.items():
        expected, u_r = weight_svd_reference(W[name], RANK, minor=False)
        torch.testing.assert_close(product(m), expected, rtol=1e-5, atol=1e-6)  # s = 1 factors
        assert principal_angle(m.lora_B.T.double().T, u_r) < 1e-3
