"""``lora_da.host_linalg``: the batched Cholesky factorization and solves of the preparation,
on the compiled core's OpenBLAS, against float64 oracles computed another way.

Oracles: ``L Lᵀ`` reproduces the matrix (backward error ≲ n·ε·‖A‖ for Cholesky), ``L``
agrees with ``torch.linalg.cholesky`` (MKL) to cond-scaled rounding, and a solve's residual
``‖A X − B‖`` is at the backward-stable level ``n·ε·‖A‖‖X‖`` (float64; float32 by its own ε).
"""

from __future__ import annotations

import pytest
import torch

from lora_da import host_linalg
from lora_da._native import core


def _spd(batch: int, n: int, seed: int, dtype=torch.float64, condition: float = 1e3) -> torch.Tensor:
    """Symmetric positive definite matrices with eigenvalues spread over ``condition``."""
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(batch, n, n, generator=generator, dtype=torch.float64))
    values = torch.logspace(0, -torch.log10(torch.tensor(condition)).item(), n, dtype=torch.float64)
    return ((q * values) @ q.mT).to(dtype)


EPS = {torch.float64: 2.0**-52, torch.float32: 2.0**-23}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("batch, n", [(1, 1), (3, 2), (4, 17), (2, 130), (5, 64)])
def test_factor_reproduces_the_matrix_and_matches_torch(batch, n, dtype):
    a = _spd(batch, n, seed=n, dtype=dtype)
    before = a.clone()
    factor, info = host_linalg.cholesky_lower(a)
    assert torch.equal(a, before), "cholesky_lower must not write its input"
    assert info.tolist() == [0] * batch
    assert factor.stride()[-2:] == (n, 1) and torch.equal(factor, factor.tril()), "row-major lower, zeros above"
    rebuilt = factor.to(torch.float64) @ factor.to(torch.float64).mT
    scale = a.to(torch.float64).abs().amax(dim=(-2, -1), keepdim=True)
    assert ((rebuilt - a.to(torch.float64)).abs() / scale).max() <= 4 * n * EPS[dtype]
    expected = torch.linalg.cholesky(a.to(torch.float64))
    torch.testing.assert_close(factor.to(torch.float64), expected, rtol=0, atol=1e4 * n * EPS[dtype])


def test_strided_batches_spaced_and_repeated():
    """Matrices equally spaced in one storage (every other one) and one matrix repeated (spacing 0)."""
    storage = _spd(6, 9, seed=1)
    spaced = storage[::2]  # stride 2·81
    factor, info = host_linalg.cholesky_lower(spaced)
    torch.testing.assert_close(factor, torch.linalg.cholesky(spaced), rtol=0, atol=1e-12)
    repeated = storage[0].expand(4, 9, 9)
    factor, info = host_linalg.cholesky_lower(repeated)
    assert info.tolist() == [0] * 4
    torch.testing.assert_close(factor, torch.linalg.cholesky(storage[0]).expand(4, 9, 9), rtol=0, atol=1e-12)


def test_a_matrix_that_is_not_positive_definite_is_reported_not_hidden():
    a = _spd(3, 12, seed=2)
    a[1, 5, 5] = -1.0  # the leading minor of order 6 is no longer positive definite
    factor, info = host_linalg.cholesky_lower(a)
    assert info[0] == 0 and info[2] == 0 and info[1] == 6
    torch.testing.assert_close(factor[2], torch.linalg.cholesky(a[2]), rtol=0, atol=1e-12)
    nan = _spd(1, 5, seed=3)
    nan[0, 2, 2] = float("nan")
    _, info = host_linalg.cholesky_lower(nan)
    assert info[0] != 0 or not torch.isfinite(host_linalg.cholesky_lower(nan)[0]).all()


def test_in_place_factor_overwrites_and_the_column_major_view_falls_back():
    a = _spd(3, 20, seed=4)
    expected = torch.linalg.cholesky(a)
    work = a.clone()
    info = host_linalg.cholesky_lower_(work)
    assert info.tolist() == [0, 0, 0]
    torch.testing.assert_close(work, expected, rtol=0, atol=1e-12)
    column_major = a.mT.contiguous().mT  # same values, transposed layout: torch's path
    info = host_linalg.cholesky_lower_(column_major)
    torch.testing.assert_close(column_major, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", ["core", "torch"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("batch, n, nrhs", [(1, 1, 1), (3, 7, 2), (4, 33, 50), (2, 130, 9), (3, 16, 0)])
def test_solve_residual_is_backward_stable(batch, n, nrhs, dtype, backend):
    a = _spd(batch, n, seed=n + nrhs, dtype=dtype, condition=1e2)
    factor, _ = host_linalg.cholesky_lower(a)
    generator = torch.Generator().manual_seed(7)
    rhs = torch.randn(batch, nrhs, n, generator=generator, dtype=torch.float64).to(dtype)  # stored transposed, as G
    x = rhs.clone()
    pointer = x.data_ptr()
    host_linalg.cholesky_solve_(x, factor, backend=backend)
    assert x.data_ptr() == pointer
    a64, x64, b64 = a.to(torch.float64), x.to(torch.float64).mT, rhs.to(torch.float64).mT
    residual = (a64 @ x64 - b64).abs().amax() if nrhs else torch.tensor(0.0)
    bound = 8 * n * EPS[dtype] * a64.abs().amax() * x64.abs().sum(-2).amax() if nrhs else 0.0
    assert residual <= bound + 1e-300
    if nrhs:
        torch.testing.assert_close(x64, torch.linalg.solve(a64, b64), rtol=1e3 * n * EPS[dtype], atol=1e3 * n * EPS[dtype])


@pytest.mark.parametrize("backend", ["core", "torch"])
def test_solve_with_shared_and_spaced_factors(backend):
    a = _spd(1, 10, seed=5)
    factor, _ = host_linalg.cholesky_lower(a)
    shared = factor[0].expand(3, 10, 10)  # one factor for three right-hand sides (spacing 0)
    rhs = torch.randn(3, 4, 10, dtype=torch.float64)
    x = rhs.clone()
    host_linalg.cholesky_solve_(x, shared, backend=backend)
    torch.testing.assert_close(x.mT, torch.linalg.solve(a[0], rhs.mT), rtol=1e-10, atol=1e-12)
    several = _spd(6, 10, seed=8)
    spaced = host_linalg.cholesky_lower(several)[0][::2]  # every other factor of one storage
    x = rhs.clone()
    host_linalg.cholesky_solve_(x, spaced, backend=backend)
    torch.testing.assert_close(x.mT, torch.linalg.solve(several[::2], rhs.mT), rtol=1e-10, atol=1e-12)


def test_solve_backend_policy_and_bad_names(monkeypatch):
    monkeypatch.setenv("LORA_DA_HOST_SOLVES", "core")
    assert host_linalg.solve_backend() == "core"
    monkeypatch.setenv("LORA_DA_HOST_SOLVES", "torch")
    assert host_linalg.solve_backend() == "torch"
    monkeypatch.setenv("LORA_DA_HOST_SOLVES", "mkl")
    with pytest.raises(ValueError, match="LORA_DA_HOST_SOLVES must be 'core' or 'torch'"):
        host_linalg.solve_backend()
    monkeypatch.delenv("LORA_DA_HOST_SOLVES")
    monkeypatch.setattr(host_linalg, "_cpu_vendor", lambda: "AuthenticAMD")
    assert host_linalg.solve_backend() == "core"
    monkeypatch.setattr(host_linalg, "_cpu_vendor", lambda: "GenuineIntel")
    assert host_linalg.solve_backend() == ("torch" if torch.backends.mkl.is_available() else "core")
    a = _spd(1, 4, seed=9)
    with pytest.raises(ValueError, match="backend must be 'core' or 'torch'"):
        host_linalg.cholesky_solve_(torch.zeros(1, 2, 4, dtype=torch.float64), host_linalg.cholesky_lower(a)[0], backend="x")


def test_solve_bad_shapes():
    shared = host_linalg.cholesky_lower(_spd(1, 10, seed=5))[0].expand(3, 10, 10)
    with pytest.raises(ValueError, match=r"cholesky_solve_: right-hand sides \(B, nrhs, n\)"):
        host_linalg.cholesky_solve_(torch.zeros(3, 4, 9, dtype=torch.float64), shared)


def test_core_checks_its_arguments():
    a = _spd(2, 4, seed=6)
    with pytest.raises(ValueError, match="dtype must be 'float32' or 'float64'"):
        core().cholesky_lower(a.data_ptr(), 2, 4, 16, "float16", 1)
    with pytest.raises(ValueError, match="must not overlap"):
        core().cholesky_lower(a.data_ptr(), 2, 4, 8, "float64", 1)
    with pytest.raises(ValueError, match="n must be in"):
        core().cholesky_lower(a.data_ptr(), 2, 0, 16, "float64", 1)
    with pytest.raises(ValueError, match="threads must be"):
        core().cholesky_solve(a.data_ptr(), 16, a.data_ptr(), 16, 2, 4, 4, "float64", 0)
    with pytest.raises(ValueError, match="right-hand sides must not overlap"):
        core().cholesky_solve(a.data_ptr(), 16, a.data_ptr(), 4, 2, 4, 4, "float64", 1)
    with pytest.raises(ValueError, match="null"):
        core().cholesky_solve(0, 16, a.data_ptr(), 16, 2, 4, 4, "float64", 1)
    assert torch.equal(a, _spd(2, 4, seed=6)), "a refused call must not write"
