"""Batched Cholesky factorizations and solves of LoRA-DA's preparation (docs/math.md §3, §5.3).

On the CPU they run in the compiled core (``lora_da._core.cholesky_lower`` /
``cholesky_solve``: OpenBLAS's ``?potrf`` and ``?trsm``, in place, over strided
batches); elsewhere — other devices, layouts the core does not take — through
torch. On the 2-core AMD machine this project is developed on, torch's batched
float64 calls (MKL) took 1.6–3x as long as the core's at SmolLM2's shapes
(``bench/bench_host_linalg.py``), and the in-place solve needs no output copy.

Layouts: every matrix row-major ``n x n`` (``stride(-2, -1) == (n, 1)``); a batch is
``(B, n, n)``, its matrices equally spaced in one storage (a
:func:`lora_da.methods.lora_da_batched.stack_views` view is fine; spacing 0 repeats
one matrix). Right-hand sides of :func:`cholesky_solve_` are stored transposed: a
row-major ``(B, nrhs, n)`` tensor whose ``.mT`` is the ``n x nrhs`` system, as a
stacked gradient ``G`` (``d_out x d_in``) is ``Gᵀ``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ._native import core

_DTYPES = {torch.float32: "float32", torch.float64: "float64"}


def _matrix_step(batch: torch.Tensor) -> Optional[int]:
    """Elements between consecutive matrices of ``batch`` (B, rows, cols) when each is row-major
    contiguous and the core can read them; ``None`` otherwise."""
    if batch.device.type != "cpu" or batch.dtype not in _DTYPES or batch.dim() != 3:
        return None
    if batch.shape[-1] > 1 and batch.stride(-1) != 1:
        return None
    if batch.shape[-2] > 1 and batch.stride(-2) != batch.shape[-1]:
        return None
    return batch.stride(0) if batch.shape[0] > 1 else batch.shape[-2] * batch.shape[-1]


def cholesky_lower(matrices: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(L, info)`` for symmetric ``matrices`` (``(B, n, n)``, the lower triangle read):
    ``L`` a fresh row-major ``(B, n, n)`` batch of lower factors (zeros above the diagonal)
    and ``info`` (``(B,)`` int32, 0 where the matrix was positive definite; elsewhere ``L``
    is not a factor). ``matrices`` is not written."""
    if _matrix_step(matrices) is None:
        upper, info = torch.linalg.cholesky_ex(matrices, upper=True)
        return upper.mT, info  # LAPACK's column-major upper factor is the row-major lower one
    factors = matrices.clone(memory_format=torch.contiguous_format)
    return factors, cholesky_lower_(factors)


def cholesky_lower_(matrices: torch.Tensor) -> torch.Tensor:
    """In place: each matrix of ``matrices`` (``(B, n, n)``, lower triangle read, no two
    sharing storage) becomes its lower Cholesky factor, zeros above the diagonal. Returns
    ``info`` as :func:`cholesky_lower` does (a failed matrix is left partly overwritten)."""
    batch, n = matrices.shape[0], matrices.shape[-1]
    step = _matrix_step(matrices)
    if step is None or (batch > 1 and step < n * n):
        factors, info = cholesky_lower(matrices)  # which does not write its input
        matrices.copy_(factors)
        return info
    values = core().cholesky_lower(matrices.data_ptr(), batch, n, step, _DTYPES[matrices.dtype], torch.get_num_threads())
    return torch.tensor(values, dtype=torch.int32)


def cholesky_solve_(rhs_transposed: torch.Tensor, factors: torch.Tensor) -> None:
    """In place: ``rhs_transposed[b].mT ← (L_b L_bᵀ)⁻¹ rhs_transposed[b].mT`` for the row-major
    lower factors ``factors`` (``(B, n, n)``) and ``rhs_transposed`` (``(B, nrhs, n)``, the
    systems' right-hand sides stored transposed, no two sharing storage)."""
    if rhs_transposed.dim() != 3 or factors.dim() != 3 or rhs_transposed.shape[0] != factors.shape[0] \
            or rhs_transposed.shape[-1] != factors.shape[-1] or factors.shape[-1] != factors.shape[-2]:
        raise ValueError(
            f"cholesky_solve_: right-hand sides (B, nrhs, n) and factors (B, n, n) of one B and n, "
            f"got {tuple(rhs_transposed.shape)} and {tuple(factors.shape)}"
        )
    batch, nrhs, n = rhs_transposed.shape
    factor_step, rhs_step = _matrix_step(factors), _matrix_step(rhs_transposed)
    usable = (
        factor_step is not None and rhs_step is not None and factors.dtype == rhs_transposed.dtype
        and (batch == 1 or rhs_step >= n * nrhs)
    )
    if not usable:
        rhs_transposed.mT.copy_(torch.cholesky_solve(rhs_transposed.mT, factors.mT, upper=True))
        return
    core().cholesky_solve(
        factors.data_ptr(), factor_step, rhs_transposed.data_ptr(), rhs_step, batch, n, nrhs,
        _DTYPES[factors.dtype], torch.get_num_threads(),
    )
