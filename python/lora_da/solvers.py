"""Eigen-solvers for the Initialization Guidance Matrix Ω.

The reference solver is dense: ``torch.linalg.eigh`` in float64, exact up to
rounding. It is the oracle the iterative solvers are tested against.
"""

from __future__ import annotations

import contextlib
import math
import operator
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch

from ._native import core

EIGH_BACKEND = "torch.linalg.eigh (float64)"


def smallest_eigenpairs(matrix: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` smallest eigenvalues (ascending) and eigenvectors (columns) of a
    symmetric matrix, computed densely in float64 with ``torch.linalg.eigh``."""
    if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"expected a square matrix, got shape {tuple(matrix.shape)}")
    if not 1 <= k <= matrix.shape[0]:
        raise ValueError(f"k={k} must lie in [1, {matrix.shape[0]}]")
    values, vectors = torch.linalg.eigh(matrix.to(torch.float64))
    return values[:k], vectors[:, :k]


def fix_column_signs(vectors: torch.Tensor) -> torch.Tensor:
    """Flip each column so that its largest-magnitude entry is positive (the first
    such entry on ties), making eigenvectors deterministic."""
    index = vectors.abs().argmax(dim=0, keepdim=True)
    signs = torch.sign(torch.gather(vectors, 0, index))
    signs[signs == 0] = 1
    return vectors * signs


# --------------------------------------------------------------------------
# Batched blocked LOBPCG (compiled core, csrc/lobpcg.hpp)
# --------------------------------------------------------------------------

DEFAULT_MAX_ITER = 500
MAX_COUNT = 2**31 - 1  # the core's BLAS sizes and iteration counts are 32-bit ints (csrc/bindings.cpp)
MAX_SEED = 2**64 - 1  # the core's seed is a uint64


def _as_int(name: str, value: object) -> int:
    """``value`` as an int; one-line ``TypeError`` naming the argument for a bool or a non-integer."""
    if isinstance(value, bool):
        raise TypeError(f"lobpcg: {name} must be an int, got bool ({value!r})")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"lobpcg: {name} must be an int, got {type(value).__name__} ({value!r})") from None


def _check_int(name: str, value: object, low: int, high: int, high_text: str) -> int:
    """``value`` as an int in ``[low, high]`` (``TypeError`` see :func:`_as_int`, ``ValueError`` out of range)."""
    number = _as_int(name, value)
    if not low <= number <= high:
        raise ValueError(f"lobpcg: {name}={number} must lie in [{low}, {high_text}]")
    return number


def _check_options(k: object, largest: object, tol: object, max_iter: object, seed: object, guard: object) -> dict:
    """The solver options checked in Python (so that a caller sees its own argument's name,
    not the core's request field), as the fields both core requests take."""
    _as_int("k", k)  # its range [1, n] is checked against the operator's size
    if tol is not None:
        if isinstance(tol, bool) or not isinstance(tol, (int, float)):
            raise TypeError(f"lobpcg: tol must be a float or None, got {type(tol).__name__} ({tol!r})")
        if not (math.isfinite(tol) and tol > 0):
            raise ValueError(f"lobpcg: tol must be finite and > 0 (None = the default), got {tol!r}")
    return dict(
        guard=None if guard is None else _check_int("guard", guard, 0, MAX_COUNT, "2147483647"),
        largest=bool(largest),
        tol=None if tol is None else float(tol),
        max_iter=_check_int("max_iter", max_iter, 0, MAX_COUNT, "2147483647"),
        seed=_check_int("seed", seed, 0, MAX_SEED, "2**64 - 1"),
    )


@dataclass
class LoraDAOperator:
    """LoRA-DA's Initialization Guidance Matrix as an operator (docs/math.md §5.3),

        Ω v = −α D (Dᵀ v) + variance_scale · Z⁻¹ v,

    given ``D = Δ̂`` (``(*batch, d_in, d_out)``) and the lower Cholesky factor
    ``L`` of ``Z`` (``(*batch, d_in, d_in)``, or ``(d_in, d_in)`` shared by the
    whole batch). ``variance_scale`` is ``β c`` (a float or one value per
    problem). Neither Ω nor Z⁻¹ is formed: Z⁻¹ is applied by two triangular
    solves with L.
    """

    delta: torch.Tensor
    cholesky: torch.Tensor
    alpha: float
    variance_scale: Union[float, Sequence[float], torch.Tensor]
    # Optional preconditioner P = (s Z⁻¹ + αI)⁻¹ = (I − s M⁻¹)/α, given factored: the lower
    # Cholesky factor of M = sI + αZ ((*batch, d_in, d_in), see
    # lora_da.batched.guidance_preconditioners) and one shift s per problem (s ≈ βc;
    # P need not be exact). Needs α > 0.
    preconditioner_cholesky: Optional[torch.Tensor] = None
    preconditioner_shift: Union[None, float, Sequence[float], torch.Tensor] = None

    @property
    def size(self) -> int:
        return self.delta.shape[-2]

    @property
    def batch_shape(self) -> torch.Size:
        return self.delta.shape[:-2]

    def dense(self) -> torch.Tensor:
        """Ω formed explicitly in float64 (for tests and the oracle)."""
        d = self.delta.to(torch.float64)
        eye = torch.eye(self.size, dtype=torch.float64, device=d.device)
        z_inverse = torch.cholesky_solve(eye.expand(*self.cholesky.shape[:-2], -1, -1), self.cholesky.to(torch.float64))
        scale = torch.as_tensor(self.variance_scale, dtype=torch.float64, device=d.device)
        scale = scale.reshape(*scale.shape, 1, 1) if scale.dim() else scale
        omega = -self.alpha * (d @ d.transpose(-1, -2)) + scale * z_inverse
        return 0.5 * (omega + omega.transpose(-1, -2))


    def dense_preconditioner(self) -> torch.Tensor:
        """P = (I − s M⁻¹)/α formed in float64 (for tests)."""
        if self.preconditioner_cholesky is None:
            raise ValueError("this operator has no preconditioner")
        factor = self.preconditioner_cholesky.to(torch.float64)
        eye = torch.eye(self.size, dtype=torch.float64, device=factor.device)
        shift = torch.as_tensor(self.preconditioner_shift, dtype=torch.float64, device=factor.device)
        shift = shift.reshape(*shift.shape, 1, 1) if shift.dim() else shift
        return (eye - shift * torch.cholesky_inverse(factor)) / self.alpha

    def apply(self, vectors: torch.Tensor) -> torch.Tensor:
        """``Ω V`` in float64 with PyTorch (``V``: ``(*batch, d_in, j)``), for checking results."""
        d = self.delta.to(torch.float64)
        v = vectors.to(device=d.device, dtype=torch.float64)
        scale = torch.as_tensor(self.variance_scale, dtype=torch.float64, device=d.device)
        scale = scale.reshape(*scale.shape, 1, 1) if scale.dim() else scale
        bias = d @ (d.transpose(-1, -2) @ v)
        factor = self.cholesky.to(torch.float64).expand(*d.shape[:-2], -1, -1)
        if factor.is_contiguous():  # two triangular solves read the batch where it lies
            variance = torch.linalg.solve_triangular(factor.mT, torch.linalg.solve_triangular(factor, v, upper=False), upper=True)
        else:  # a strided batch (shared or spaced factors): cholesky_solve's copy is then the cheaper one
            variance = torch.cholesky_solve(v, factor.mT, upper=True)
        return -self.alpha * bias + scale * variance


def failed_eigenpairs(operator: LoraDAOperator, result: "LobpcgResult", safety: float = 100.0) -> torch.Tensor:
    """Which problems' returned pairs fail an independent check (``(*B,)`` bool).

    Recomputes ``Ω X − X Θ`` in float64 with PyTorch and flags a problem when it
    did not converge, when ``XᵀX`` is not the identity to 1e-8 (a basis that lost
    orthonormality gives Ritz values outside the spectrum), or when a residual
    exceeds ``safety`` times the solver's own threshold (computed here from the
    k returned eigenvalues, a slightly stricter scale than the solver's block).
    """
    vectors = result.eigenvectors.to(torch.float64)
    values = result.eigenvalues.to(device=vectors.device, dtype=torch.float64)
    residual = operator.apply(vectors) - vectors * values.unsqueeze(-2)
    eps = torch.finfo(result.eigenvectors.dtype).eps
    norm = result.norm_estimate.to(device=vectors.device, dtype=torch.float64)
    threshold = torch.maximum(result.tol * values.abs().amax(-1), 100 * eps * norm)
    too_large = (residual.norm(dim=-2) > safety * threshold.unsqueeze(-1)).any(-1)
    eye = torch.eye(vectors.shape[-1], dtype=torch.float64, device=vectors.device)
    not_orthonormal = (vectors.transpose(-1, -2) @ vectors - eye).abs().amax((-1, -2)) > 1e-8
    return too_large | not_orthonormal | ~result.converged.to(vectors.device)


@dataclass
class LobpcgResult:
    """Result of :func:`lobpcg` for a batch of problems (batch shape ``*B``).

    Attributes:
        eigenvalues: ``(*B, k)``, ascending (descending with ``largest=True``).
        eigenvectors: ``(*B, n, k)``, orthonormal columns.
        iterations: ``(*B,)`` LOBPCG iterations each problem ran.
        residual_norms: ``(*B, k)`` float64, ``‖A x − θ x‖`` at the end (0 for the dense fallback).
        converged: ``(*B,)`` whether all k residuals met the threshold
            ``max(tol · max|θ_block|, 100 ε · norm_estimate)``.
        norm_estimate: ``(*B,)`` the estimate of ``‖A‖₂`` (the rounding floor's scale).
        dense_fallback: True when ``n < 5·(k + guard)`` and a dense eigensolver ran instead.
        block_size: LOBPCG block (k + guard vectors), or n for the fallback.
        tol: the relative residual tolerance used.
        backend: which implementation ran.
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    iterations: torch.Tensor
    residual_norms: torch.Tensor
    converged: torch.Tensor
    norm_estimate: torch.Tensor
    dense_fallback: bool
    block_size: int
    tol: float
    backend: str


def _solver_dtype(dtype: torch.dtype) -> torch.dtype:
    if dtype == torch.float64:
        return torch.float64
    if dtype in (torch.float32, torch.float16, torch.bfloat16):
        return torch.float32
    raise TypeError(f"lobpcg needs a floating-point operator, got {dtype}")


def _matrix_batch(
    matrices: torch.Tensor, rows: int, cols: int, column_major_ok: bool = False
) -> Tuple[torch.Tensor, int, bool]:
    """``(*B, rows, cols)`` as ``(B, rows, cols)`` for the compiled core: the tensor,
    its batch stride (in elements) and whether its matrices are column-major.
    Equally spaced matrices (a strided view such as :func:`lora_da.batched.stack_views`
    makes) pass without a copy, row-major, or column-major where ``column_major_ok``."""
    flat = matrices.reshape(-1, rows, cols)
    column_major = column_major_ok and cols > 1 and flat.stride()[1:] == (1, rows)
    if not column_major and flat.stride()[1:] != (cols, 1):
        flat = flat.contiguous()
    return flat, (flat.stride(0) if flat.shape[0] > 1 else rows * cols), column_major


def _device_and_stream(tensor: torch.Tensor) -> Tuple[str, int]:
    if tensor.device.type == "cpu":
        return "cpu", 0
    if tensor.device.type == "cuda":
        return "cuda", int(torch.cuda.current_stream(tensor.device).cuda_stream)
    raise ValueError(f"lobpcg runs on CPU or CUDA tensors, not on {tensor.device}")


def lobpcg(
    matrix_or_operator: Union[torch.Tensor, LoraDAOperator],
    k: int,
    *,
    largest: bool = False,
    tol: Optional[float] = None,
    max_iter: int = DEFAULT_MAX_ITER,
    seed: int = 0,
    guard: Optional[int] = None,
    initial: Optional[torch.Tensor] = None,
) -> LobpcgResult:
    """The ``k`` smallest (or largest) eigenpairs of a batch of symmetric
    operators, by the compiled batched blocked LOBPCG (``csrc/lobpcg.hpp``).

    Args:
        matrix_or_operator: symmetric matrices ``(*B, n, n)`` (only the
            matrix is read; it must be symmetric), or a :class:`LoraDAOperator`.
            float64 runs in float64; float32/16/bf16 run in float32. CPU or
            CUDA tensors (CUDA work runs on the current stream).
        k: number of eigenpairs.
        largest: the k largest instead of the k smallest.
        tol: relative residual tolerance: a pair is converged when
            ``‖A x − θ x‖ ≤ max(tol · max|θ_block|, 100 ε ‖A‖_est)``, relative
            to the block's own Ritz values (Ω's ``‖Ω‖`` can exceed its smallest
            eigenvalues by many orders), floored at what rounding allows.
            Default 1e-10 (float64), 2e-4 (float32). The largest principal
            angle to the exact eigenspace is then about
            ``≤ √k · threshold / (λ_{k+1} − λ_k)``.
        max_iter: iteration cap (``[0, 2**31 - 1]``); problems that hit it report ``converged=False``,
            as do problems that stagnate: no progress in their residuals or Ritz values for
            ``max(50, max_iter // 5)`` iterations (docs/math.md §5.4).
        seed: the random start block is drawn from this seed (per problem), an int in ``[0, 2**64 - 1]``.
        guard: guard vectors beyond k (``[0, 2**31 - 1]``; default ``max(k, 8)``); when
            ``n < 5·(k + guard)`` a dense eigensolver runs instead (there LOBPCG's
            basis nearly fills the space and gains nothing).
        initial: optional start vectors ``(*B, n, j)`` (:class:`LoraDAOperator` only):
            the first ``min(j, k + guard)`` columns of the start block, the rest
            random. Need not be orthonormal, only independent. A good guess saves
            iterations; the answer is the same up to the tolerance.

    Raises:
        TypeError: ``k``, ``max_iter``, ``seed`` or ``guard`` not an int (a bool is
            not one), ``tol`` not a number; one line naming the argument.
        ValueError: an argument out of its range (``k`` outside ``[1, n]``, ...),
            before any work.
    """
    # fields of both requests (see csrc/bindings.cpp); guard/tol None = the solver's default
    options = _check_options(k, largest, tol, max_iter, seed, guard)
    if isinstance(matrix_or_operator, LoraDAOperator):
        op = matrix_or_operator
        delta = op.delta
        if delta.dim() < 2:
            raise ValueError("LoraDAOperator.delta must be (*batch, d_in, d_out)")
        n, d_out = delta.shape[-2], delta.shape[-1]
        batch_shape = delta.shape[:-2]
        dtype = _solver_dtype(delta.dtype)
        # a column-major Δ (what cholesky_solve returns) is read as it is
        d_flat, stride_d, d_column_major = _matrix_batch(delta.to(dtype), n, d_out, column_major_ok=True)
        batch = d_flat.shape[0]
        cholesky = op.cholesky.to(device=delta.device, dtype=dtype)
        if cholesky.shape[-2:] != (n, n):
            raise ValueError(f"cholesky factor must be (…, {n}, {n}), got {tuple(cholesky.shape)}")
        if cholesky.dim() == 2:
            cholesky_flat, stride_z = cholesky.contiguous(), 0
        else:
            if cholesky.shape[:-2] != batch_shape:
                raise ValueError("cholesky factor batch shape must match delta's (or be absent)")
            cholesky_flat, stride_z, _ = _matrix_batch(cholesky, n, n)
        scale = torch.as_tensor(op.variance_scale, dtype=torch.float64).reshape(-1).cpu()
        if scale.numel() == 1:
            scale = scale.expand(batch)
        if scale.numel() != batch:
            raise ValueError(f"variance_scale needs 1 or {batch} values, got {scale.numel()}")
        device, stream = _device_and_stream(d_flat)
        preconditioner_fields = {}
        if op.preconditioner_cholesky is not None:
            if not op.alpha > 0:
                raise ValueError(f"the preconditioner needs alpha > 0, got {op.alpha}")
            factor = op.preconditioner_cholesky
            preconditioner, stride_p, _ = _matrix_batch(factor.to(device=delta.device, dtype=dtype), n, n)
            if preconditioner.shape[0] != batch:
                raise ValueError(
                    f"preconditioner_cholesky must be (*batch, {n}, {n}) like delta, got {tuple(factor.shape)}"
                )
            if op.preconditioner_shift is None:
                raise ValueError("preconditioner_cholesky needs preconditioner_shift (one value, or one per problem)")
            shift = torch.as_tensor(op.preconditioner_shift, dtype=torch.float64).reshape(-1).cpu()
            if shift.numel() == 1:
                shift = shift.expand(batch)
            if shift.numel() != batch:
                raise ValueError(f"preconditioner_shift needs 1 or {batch} values, got {shift.numel()}")
            preconditioner_fields = dict(
                preconditioner_cholesky=preconditioner.data_ptr(),
                preconditioner_stride=stride_p,
                preconditioner_shift=[float(v) for v in shift.tolist()],
            )
        k = operator.index(k)
        if not 1 <= k <= n:
            raise ValueError(f"k={k} must lie in [1, {n}]")
        initial_fields, start = {}, None
        if initial is not None:
            if initial.dim() < 2 or initial.shape[:-2] != batch_shape or initial.shape[-2] != n:
                raise ValueError(
                    f"initial must be (*batch, {n}, j) with batch {tuple(batch_shape)}, got {tuple(initial.shape)}"
                )
            # (B, j, n) row-major = n x j column-major per problem, as the solver reads it
            start = initial.to(device=d_flat.device, dtype=dtype).reshape(batch, n, -1).transpose(-1, -2).contiguous()
            if not bool(torch.isfinite(start).all()):
                raise FloatingPointError("initial start vectors are not finite")
            initial_fields = dict(
                initial=start.data_ptr(), initial_cols=start.shape[1], initial_stride=n * start.shape[1]
            )
        vectors = torch.empty(batch, k, n, dtype=dtype, device=d_flat.device)
        request = core().GuidanceRequest(
            delta=d_flat.data_ptr(), delta_column_major=d_column_major, d_out=d_out, delta_stride=stride_d,
            cholesky=cholesky_flat.data_ptr(), cholesky_stride=stride_z,
            alpha=float(op.alpha), variance_scale=[float(v) for v in scale.tolist()],
            **preconditioner_fields, **initial_fields,
            batch=batch, n=n, dtype=str(dtype).replace("torch.", ""), k=k, **options,
            eigenvectors=vectors.data_ptr(), device=device, stream=stream,
        )
        with torch.cuda.device(d_flat.device) if device == "cuda" else contextlib.nullcontext():
            report = core().lobpcg_guidance(request)
    else:
        if initial is not None:
            raise ValueError("initial start vectors are supported for a LoraDAOperator only")
        matrix = matrix_or_operator
        if matrix.dim() < 2 or matrix.shape[-1] != matrix.shape[-2]:
            raise ValueError(f"expected (*batch, n, n) matrices, got shape {tuple(matrix.shape)}")
        n = matrix.shape[-1]
        batch_shape = matrix.shape[:-2]
        dtype = _solver_dtype(matrix.dtype)
        flat = matrix.to(dtype).reshape(-1, n, n).contiguous()
        batch = flat.shape[0]
        device, stream = _device_and_stream(flat)
        k = operator.index(k)
        if not 1 <= k <= n:
            raise ValueError(f"k={k} must lie in [1, {n}]")
        vectors = torch.empty(batch, k, n, dtype=dtype, device=flat.device)
        request = core().DenseRequest(
            matrices=flat.data_ptr(), matrix_stride=n * n,
            batch=batch, n=n, dtype=str(dtype).replace("torch.", ""), k=k, **options,
            eigenvectors=vectors.data_ptr(), device=device, stream=stream,
        )
        with torch.cuda.device(flat.device) if device == "cuda" else contextlib.nullcontext():
            report = core().lobpcg_dense(request)
    target = vectors.device
    return LobpcgResult(
        eigenvalues=torch.tensor(report["eigenvalues"], dtype=dtype).reshape(*batch_shape, k).to(target),
        eigenvectors=vectors.transpose(-1, -2).reshape(*batch_shape, n, k),
        iterations=torch.tensor(report["iterations"], dtype=torch.int64).reshape(batch_shape),
        residual_norms=torch.tensor(report["residual_norms"], dtype=torch.float64).reshape(*batch_shape, k),
        converged=torch.tensor(report["converged"], dtype=torch.bool).reshape(batch_shape),
        norm_estimate=torch.tensor(report["norm_estimate"], dtype=torch.float64).reshape(batch_shape),
        dense_fallback=bool(report["dense_fallback"]),
        block_size=int(report["block_size"]),
        tol=float(report["tol"]),
        backend=str(report["backend"]),
    )


