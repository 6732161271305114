"""Batched Cholesky factorizations and solves of LoRA-DA's preparation (docs/math.md §3, §5.3).

On the CPU the factorizations run in the compiled core (``lora_da._core.cholesky_lower``:
OpenBLAS's ``?potrf``, in place, over strided batches); the solves run in the core
(``cholesky_solve``: OpenBLAS's ``?trsm``) or in torch (``torch.linalg.solve_triangular``
writing into the right-hand sides, MKL's ``?trsm`` in the x86 wheels), by
:func:`solve_backend`; elsewhere — other devices, layouts the core does not take — torch.
Measured with ``bench/bench_host_linalg.py`` at SmolLM2's shapes (float64): on the 2-core
AMD machine torch's batched calls (MKL) took 1.6–3x as long as the core's for both; on
the Intel (Sapphire Rapids) one the core's Cholesky was still 1.1–2.3x faster than torch's,
but MKL's in-place solves were 1.7–2.2x faster than OpenBLAS's. Both solves are in place (no output
copy) and backward stable, so the choice changes the answer only at rounding level.

Layouts: every matrix row-major ``n x n`` (``stride(-2, -1) == (n, 1)``); a batch is
``(B, n, n)``, its matrices equally spaced in one storage (a
:func:`lora_da.methods.lora_da_batched.stack_views` view is fine; spacing 0 repeats
one matrix). Right-hand sides of :func:`cholesky_solve_` are stored transposed: a
row-major ``(B, nrhs, n)`` tensor whose ``.mT`` is the ``n x nrhs`` system, as a
stacked gradient ``G`` (``d_out x d_in``) is ``Gᵀ``.
"""

from __future__ import annotations

import functools
import os
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


@functools.lru_cache(maxsize=None)
def _cpu_vendor() -> str:
    """The CPU's vendor string from ``/proc/cpuinfo`` (``""`` where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def solve_backend() -> str:
    """Which library runs :func:`cholesky_solve_` on CPU tensors: ``"torch"`` where torch
    was built with MKL and the CPU is Intel's (MKL's ``?trsm`` was the faster there), else
    ``"core"`` (OpenBLAS, faster on the AMD machine measured). ``LORA_DA_HOST_SOLVES=core``
    or ``=torch`` overrides it (benchmarks and tests)."""
    forced = os.environ.get("LORA_DA_HOST_SOLVES", "")
    if forced in ("core", "torch"):
        return forced
    if forced:
        raise ValueError(f"LORA_DA_HOST_SOLVES must be 'core' or 'torch', got {forced!r}")
    return "torch" if torch.backends.mkl.is_available() and _cpu_vendor() == "GenuineIntel" else "core"


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


def cholesky_solve_(rhs_transposed: torch.Tensor, factors: torch.Tensor, backend: Optional[str] = None) -> None:
    """In place: ``rhs_transposed[b].mT ← (L_b L_bᵀ)⁻¹ rhs_transposed[b].mT`` for the row-major
    lower factors ``factors`` (``(B, n, n)``) and ``rhs_transposed`` (``(B, nrhs, n)``, the
    systems' right-hand sides stored transposed, no two sharing storage). ``backend``:
    ``"core"`` or ``"torch"`` (default: :func:`solve_backend`)."""
    backend = solve_backend() if backend is None else backend
    if backend not in ("core", "torch"):
        raise ValueError(f"cholesky_solve_: backend must be 'core' or 'torch', got {backend!r}")
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
    if backend == "torch":
        # one matrix at a time: a batched call copies a strided batch of factors (twice), while a
        # single row-major factor and column-major system are solved where they lie
        for index in range(batch):
            system, factor = rhs_transposed[index].mT, factors[index]
            torch.linalg.solve_triangular(factor, system, upper=False, left=True, out=system)
            torch.linalg.solve_triangular(factor.mT, system, upper=True, left=True, out=system)
        return
    core().cholesky_solve(
        factors.data_ptr(), factor_step, rhs_transposed.data_ptr(), rhs_step, batch, n, nrhs,
        _DTYPES[factors.dtype], torch.get_num_threads(),
    )
