"""Which implementation accumulates the K-FAC statistics.

``select_backend(device, requested, dtype, precision)`` returns a :class:`StatisticsBackend`
bundling the two accumulate functions, the end-of-pass finalize step and the
accumulators' dtypes (``precision``: ``LoraDAConfig.statistics_precision``,
docs/math.md §5.6):

* ``"auto"`` (default): the torch backend accumulates Z in float64 and G, y in
  float32; the Triton kernels everything in float32.
* ``"float32"``: Z, G and y in float32 (fastest; Z of ill-conditioned inputs
  loses its small eigenvalues).
* ``"float64"``: Z, G and y in float64 (torch backend only; G's products cost
  about twice as much as in float32).

Float64 models accumulate everything in float64 whatever ``precision`` says;
MPS devices (no float64) sum in float32 and refuse ``"float64"``.
The backends:

* ``"torch"``: plain PyTorch (``kfac_stats``), any device and dtype: Z on its
  lower triangle (mirrored at the end of the pass; float64 sums on the CPU by the
  core's OpenBLAS ``dsyrk``, ``kfac_stats_cpu``, panel ``addmm``s elsewhere), G and y
  as in the reference; the products in the accumulators' dtype.
* ``"triton"``: the Triton kernels (``kfac_stats_triton``), float32
  accumulators only; CUDA tensors with
  bf16/fp16/fp32 activations, or CPU tensors under ``TRITON_INTERPRET=1``
  (the interpreter: for tests only, it is slow; the switch is
  ``triton_launch.INTERPRETING``). Anything else raises: an explicit request is
  never silently replaced.
* ``"auto"``: Triton on CUDA devices when Triton is installed, the
  activations are not fp64 (fp64 models keep fp64 accumulators, which the
  kernels do not offer) and ``precision`` is not ``"float64"``; the torch backend everywhere else.

The chosen ``name`` is what :class:`lora_da.LoraInit` reports under
``backends["statistics"]``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import kfac_stats, kfac_stats_cpu

STATS_BACKENDS = ("auto", "torch", "triton")


STATISTICS_PRECISIONS = ("auto", "float32", "float64")


@dataclass(frozen=True)
class StatisticsBackend:
    """The functions the statistics pass calls (signatures of ``kfac_stats``), and the
    accumulators' precision (docs/math.md §5.6): Z in float64 when
    ``input_factor_float64``, G and y in float64 when ``gradient_float64``; float32
    otherwise (float64 models always accumulate in float64)."""

    name: str
    accumulate_input_factor: Callable
    accumulate_output_statistics: Callable
    finalize_input_factor: Callable[[torch.Tensor], None]
    input_factor_float64: bool = False
    gradient_float64: bool = False

    def input_factor_dtype(self, activation_dtype: torch.dtype) -> torch.dtype:
        """The dtype of Z's accumulator for activations of ``activation_dtype``."""
        return torch.float64 if self.input_factor_float64 or activation_dtype == torch.float64 else torch.float32

    def gradient_dtype(self, activation_dtype: torch.dtype) -> torch.dtype:
        """The dtype of G's and y's accumulators for activations of ``activation_dtype``."""
        return torch.float64 if self.gradient_float64 or activation_dtype == torch.float64 else torch.float32


TORCH_BACKEND = StatisticsBackend(
    name="torch",
    accumulate_input_factor=kfac_stats_cpu.accumulate_input_factor_lower,  # panels where it does not apply
    accumulate_output_statistics=kfac_stats.accumulate_output_statistics,
    finalize_input_factor=kfac_stats.mirror_lower_triangle,
    input_factor_float64=True,
)


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _triton_backend() -> StatisticsBackend:
    from . import kfac_stats_triton

    return StatisticsBackend(
        name="triton",
        accumulate_input_factor=kfac_stats_triton.accumulate_input_factor,
        accumulate_output_statistics=kfac_stats_triton.accumulate_output_statistics,
        finalize_input_factor=kfac_stats_triton.finalize_input_factor,
    )


def _torch_backend(precision: str, device: torch.device) -> StatisticsBackend:
    if device.type == "mps":  # no float64 on Apple GPUs: float32 sums (docs/math.md §5.6)
        if precision == "float64":
            raise ValueError("statistics_precision='float64' is not available on MPS devices (no float64 there)")
        return dataclasses.replace(TORCH_BACKEND, input_factor_float64=False)
    return dataclasses.replace(
        TORCH_BACKEND, input_factor_float64=precision != "float32", gradient_float64=precision == "float64"
    )


def select_backend(
    device: torch.device, requested: str = "auto", dtype: Optional[torch.dtype] = None, precision: str = "auto"
) -> StatisticsBackend:
    """The statistics backend for activations of ``dtype`` on ``device`` accumulating
    with ``precision`` (``statistics_precision``, see the module doc)."""
    if requested not in STATS_BACKENDS:
        raise ValueError(f"stats_backend must be one of {STATS_BACKENDS}, got {requested!r}")
    if precision not in STATISTICS_PRECISIONS:
        raise ValueError(f"statistics_precision must be one of {STATISTICS_PRECISIONS}, got {precision!r}")
    device = torch.device(device)
    if requested == "torch":
        return _torch_backend(precision, device)
    if requested == "auto":
        if device.type == "cuda" and dtype != torch.float64 and precision != "float64" and triton_available():
            return _triton_backend()
        return _torch_backend(precision, device)
    if precision == "float64":
        raise ValueError("stats_backend='triton' accumulates in float32; statistics_precision='float64' needs stats_backend='torch' or 'auto'")
    # explicit "triton"
    if not triton_available():
        raise RuntimeError("stats_backend='triton' needs the 'triton' package (pip install triton)")
    if dtype == torch.float64:
        raise TypeError("stats_backend='triton' accumulates in float32; fp64 models need stats_backend='torch'")
    if device.type != "cuda":
        # Imported here, not at the top: INTERPRETING is read on the first import, which
        # must come after TRITON_INTERPRET is set (importing lora_da does not import it).
        from . import triton_launch

        if not triton_launch.interpreter_requested():
            raise RuntimeError(
                f"stats_backend='triton' on a {device.type} device runs only under the Triton "
                "interpreter (TRITON_INTERPRET=1 set before lora_da's kernels are imported; tests only)"
            )
        if not triton_launch.INTERPRETING:
            raise RuntimeError(
                "TRITON_INTERPRET=1 was set after lora_da's Triton kernels were imported "
                "(lora_da.kernels.triton_launch); set it before"
            )
    return _triton_backend()
