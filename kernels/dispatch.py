"""Which implementation accumulates the K-FAC statistics.

``select_backend(device, requested, dtype)`` returns a :class:`StatisticsBackend`
bundling the two accumulate functions and the end-of-pass finalize step:

* ``"torch"``: plain PyTorch (``kfac_stats``), any device and dtype: Z on its
  lower triangle (panel ``addmm``s, mirrored at the end of the pass), G and y
  as in the reference.
* ``"triton"``: the Triton kernels (``kfac_stats_triton``); CUDA tensors with
  bf16/fp16/fp32 activations, or CPU tensors under ``TRITON_INTERPRET=1``
  (the interpreter: for tests only, it is slow; the switch is
  ``triton_launch.INTERPRETING``). Anything else raises: an explicit request is
  never silently replaced.
* ``"auto"``: Triton on CUDA devices when Triton is installed and the
  activations are not fp64 (fp64 models keep fp64 accumulators, which the
  kernels do not offer); the reference everywhere else.

The chosen ``name`` is what :class:`lora_da.LoraInit` reports under
``backends["statistics"]``.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import kfac_stats

STATS_BACKENDS = ("auto", "torch", "triton")


@dataclass(frozen=True)
class StatisticsBackend:
    """The functions the statistics pass calls (signatures of ``kfac_stats``)."""

    name: str
    accumulate_input_factor: Callable
    accumulate_output_statistics: Callable
    finalize_input_factor: Callable[[torch.Tensor], None]


TORCH_BACKEND = StatisticsBackend(
    name="torch",
    accumulate_input_factor=kfac_stats.accumulate_input_factor_lower,
    accumulate_output_statistics=kfac_stats.accumulate_output_statistics,
    finalize_input_factor=kfac_stats.mirror_lower_triangle,
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


def select_backend(
    device: torch.device, requested: str = "auto", dtype: Optional[torch.dtype] = None
) -> StatisticsBackend:
    """The statistics backend for activations of ``dtype`` on ``device`` (see module doc)."""
    if requested not in STATS_BACKENDS:
        raise ValueError(f"stats_backend must be one of {STATS_BACKENDS}, got {requested!r}")
    device = torch.device(device)
    if requested == "torch":
        return TORCH_BACKEND
    if requested == "auto":
        if device.type == "cuda" and dtype != torch.float64 and triton_available():
            return _triton_backend()
        return TORCH_BACKEND
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
