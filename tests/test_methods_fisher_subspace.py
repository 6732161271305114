"""``method="fisher-subspace"`` (lora_da/methods/fisher_subspace.py): the Fisher-optimal rank-r step,
against an independent eigh recomputation from autograd statistics."""

import pytest
import torch

from helpers import METHOD_RANK as RANK
from helpers import product
from helpers import run_method as run

pytestmark = pytest.mark.filterwarnings("ignore:train_size not given")

F64 = torch.float64


def test_fisher_subspace_against_eigh_recomputation(data, llama_oracle):
    G, Z, y, _ = llama_oracle
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


def test_fisher_subspace_damping_escalations_give_one_warning():
    """fisher-subspace damps Z by LoRA-DA's rule: its escalations too are summed up in one
    warning per call (at the caller's line), which LoraDAWarning filters silence (--quiet)."""
    import warnings

    import lora_da
    from lora_da.models import batches, synthetic_samples, tiny_llama
    from lora_da.user_warnings import DampingWarning, LoraDAWarning

    loader = list(batches(synthetic_samples(2, min_len=8, max_len=8, seed=3), 2))  # 16 tokens < d_in; 1e-20: below float64 rounding

    def call():
        return lora_da.initialize(tiny_llama(), loader, rank=2, method="fisher-subspace", damping=1e-20, progress=False)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        init = call()
    caught = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    raised = [name for name, m in init.modules.items() if m.damping > 1e-20]
    assert len(raised) > 1 and len(caught) == 1
    assert caught[0].category is DampingWarning and caught[0].filename == __file__
    assert str(caught[0].message).startswith(f"{len(raised)} modules (") and "fewer tokens than d_in" in str(caught[0].message)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.simplefilter("ignore", LoraDAWarning)
        call()
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)]
