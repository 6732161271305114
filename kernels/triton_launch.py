"""Launch policy of the Triton kernels: interpreter switch, autotune configurations,
block sizes and ``tl.dot`` precision, in one place.

The kernel modules (``kfac_stats_triton``, ``omega_triton``) import this module
before they define their ``@triton.jit`` functions; ``dispatch`` reads its
interpreter switch. Importing it does not import ``triton`` (only
:func:`statistics_configs` does), so ``dispatch`` may use it on machines
without Triton.

* :data:`INTERPRETING`: whether the kernels run under the Triton interpreter
  (``TRITON_INTERPRET`` when this module was first imported). Under the
  interpreter the loaded tiles are upcast to fp32 (:data:`UPCAST_TILES`; its
  bf16/fp16 arithmetic is not the GPU's), one autotune configuration is used and
  every block is :data:`INTERPRETER_BLOCK` wide.
* :func:`check_device`: where the kernels can run (CUDA, or anything under the interpreter).
* :func:`statistics_configs`: the autotune table of both statistics kernels.
* :func:`dot_precision`: the ``input_precision`` of their ``tl.dot`` calls.
* :func:`omega_blocks`: the fixed block sizes of the Ω kernel.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

# Triton's own reading of the variable (case-insensitive, no surrounding spaces);
# tests/test_kernels_dispatch.py compares it with triton.knobs.
_TRUE = ("1", "true", "on", "y", "yes")


def interpreter_requested() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for the Triton interpreter *now*."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in _TRUE


INTERPRETING: bool = interpreter_requested()
"""The variable as read when this module was first imported: the mode the kernels were
defined in (Triton reads it when ``@triton.jit`` runs). Set it before importing the
Triton modules of ``lora_da.kernels``."""

UPCAST_TILES: bool = INTERPRETING
"""Cast loaded bf16/fp16 tiles to fp32 before ``tl.dot`` (interpreter only)."""

INTERPRETER_BLOCK = 32
"""Every block size under the interpreter: it keeps the program count low, and the
tests use shapes that are not multiples of it."""


def check_device(device: torch.device, what: str) -> None:
    """Raise unless ``what`` can run on ``device``: CUDA tensors, or any under the interpreter."""
    if torch.device(device).type != "cuda" and not INTERPRETING:
        raise RuntimeError(
            f"{what} needs CUDA tensors, got {torch.device(device).type} ones "
            "(CPU tensors run only under the Triton interpreter, TRITON_INTERPRET=1; tests only)"
        )


# Statistics kernels on a GPU: (BLOCK_D, BLOCK_T, num_warps, num_stages). BLOCK_D is the
# side of the output tile (Z, or G's d_out x d_in tile), BLOCK_T the token block.
STATISTICS_TILES = (
    (128, 32, 8, 4),
    (128, 64, 8, 3),
    (128, 64, 4, 4),
    (64, 64, 4, 4),
    (64, 32, 4, 5),
    (128, 128, 8, 3),
)


def statistics_configs(interpreting: bool = INTERPRETING) -> list:
    """Autotune configurations (``triton.Config``) of the two statistics kernels
    (``Z += aᵀ diag(m) a`` and ``y, G``); one configuration under the interpreter."""
    import triton

    if interpreting:
        block = INTERPRETER_BLOCK
        return [triton.Config({"BLOCK_D": block, "BLOCK_T": block}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_D": block_d, "BLOCK_T": block_t}, num_warps=warps, num_stages=stages)
        for block_d, block_t, warps, stages in STATISTICS_TILES
    ]


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s ``input_precision`` for inputs of ``dtype``.

    fp32 inputs: ``"ieee"``, IEEE fp32 products as the reference's fp32 ``addmm``
    (TF32 would lose ~3 decimal digits). 16-bit inputs: the flag does not apply
    (products of two bf16/fp16 values are exact in fp32); ``"tf32"`` is Triton's default.
    """
    return "ieee" if dtype == torch.float32 else "tf32"


@dataclass(frozen=True)
class OmegaBlocks:
    """Launch parameters of the Ω kernel: output tile side, reduction block, warps, and
    whether the product runs on ``tl.dot`` (fp32) or a multiply-and-sum (fp64)."""

    block_d: int
    block_k: int
    num_warps: int
    use_dot: bool


def omega_blocks(dtype: torch.dtype, interpreting: bool = INTERPRETING) -> OmegaBlocks:
    """Fixed block sizes of the Ω kernel for ``delta`` of ``dtype`` (fp32 or fp64).

    Ω is built once per module, so it is not autotuned. fp64: no ``tl.dot`` (not
    available on every Triton/GPU pair), a ``BLOCK_D x BLOCK_K x BLOCK_D`` broadcast
    product, hence the small ``BLOCK_K``.
    """
    use_dot = dtype == torch.float32
    if interpreting:
        return OmegaBlocks(INTERPRETER_BLOCK, INTERPRETER_BLOCK, 4, use_dot)
    if use_dot:
        return OmegaBlocks(64, 32, 4, use_dot)
    return OmegaBlocks(32, 8, 4, use_dot)
