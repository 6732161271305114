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
* :func:`statistics_configs`: the autotune table of both statistics kernels
  (``LORA_DA_TRITON_AUTOTUNE=0``: only :data:`PINNED_STATISTICS_TILE`, no autotuning).
* :func:`token_splits`: how many token ranges a statistics launch sums separately.
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


PINNED_STATISTICS_TILE = (128, 64, 8, 3)
"""The one configuration used when autotuning is off (``LORA_DA_TRITON_AUTOTUNE=0``) and
by the CUDA test runs (tests/kernel_checks.py): no benchmarking, one compile per variant."""


def autotune_enabled() -> bool:
    """``LORA_DA_TRITON_AUTOTUNE`` (default on); ``0``/``false``/``off`` pins one configuration."""
    return os.environ.get("LORA_DA_TRITON_AUTOTUNE", "1").strip().lower() not in ("0", "false", "off", "no", "n")


def statistics_configs(interpreting: bool = INTERPRETING, tiles=STATISTICS_TILES) -> list:
    """Autotune configurations (``triton.Config``) of the two statistics kernels
    (``Z += aᵀ diag(m) a`` and ``y, G``), one per entry of ``tiles``; one configuration
    under the interpreter."""
    import triton

    if interpreting:
        block = INTERPRETER_BLOCK
        return [triton.Config({"BLOCK_D": block, "BLOCK_T": block}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_D": block_d, "BLOCK_T": block_t}, num_warps=warps, num_stages=stages)
        for block_d, block_t, warps, stages in tiles
    ]


def _tile_of(config) -> tuple:
    return (config.kwargs["BLOCK_D"], config.kwargs["BLOCK_T"], config.num_warps, config.num_stages)


def prune_statistics_configs(configs, named_args=None, **kwargs) -> list:
    """The autotuner's ``early_config_prune`` hook, called when a new key is tuned: all
    ``configs``, or only the pinned one when ``LORA_DA_TRITON_AUTOTUNE=0`` *now* (read at
    launch, so a test session or a benchmark's warm-up can set it after the import).
    A list without the pinned tile is left to its first entry."""
    if autotune_enabled():
        return list(configs)
    pinned = [config for config in configs if _tile_of(config) == PINNED_STATISTICS_TILE]
    return pinned or list(configs)[:1]


# Split over tokens (kfac_stats_triton). Fixed numbers, not the device's SM count, so that
# the split, hence the rounding, depends on the shapes alone.
SPLIT_TARGET_PROGRAMS = 264
"""Programs a statistics launch aims for: two waves over an H100/H200's 132 SMs."""
SPLIT_BLOCK_D = 128
"""Output tile side assumed when counting programs (the table's largest BLOCK_D)."""
MIN_TOKENS_PER_SPLIT = 1024
"""No split gets fewer tokens: below that the partial sums cost more than they save."""
MAX_SPLITS = 32
MAX_PARTIAL_BYTES = 512 * 2**20
"""Cap on the fp32 partial-sum buffer of one launch (splits x output entries x 4 bytes)."""
TOKEN_ALIGN = 128
"""Each split's token count is a multiple of this (the table's largest BLOCK_T)."""


@dataclass(frozen=True)
class TokenSplits:
    """``count`` token ranges of ``tokens_per_split`` tokens (the last one shorter), and the
    autotune bucket of the range length (a power of two: configurations are keyed by it)."""

    count: int
    tokens_per_split: int
    bucket: int


def token_splits(num_tokens: int, programs: int, output_entries: int, requested=None) -> TokenSplits:
    """How a statistics launch over ``num_tokens`` tokens with ``programs`` output tiles
    (counted with :data:`SPLIT_BLOCK_D`) and ``output_entries`` fp32 outputs splits its tokens.

    ``requested``: the number of splits (tests, benchmarks), else enough splits to reach
    :data:`SPLIT_TARGET_PROGRAMS` programs, within the caps above.
    """
    if requested is not None:
        if int(requested) < 1:
            raise ValueError(f"num_splits must be >= 1, got {requested}")
        count = min(int(requested), max(num_tokens, 1))
        tokens_per_split = -(-num_tokens // count)
    else:
        count = min(
            MAX_SPLITS,
            -(-SPLIT_TARGET_PROGRAMS // max(programs, 1)),
            num_tokens // MIN_TOKENS_PER_SPLIT,
            MAX_PARTIAL_BYTES // max(4 * output_entries, 1),
        )
        count = max(count, 1)
        tokens_per_split = -(-num_tokens // count)
        tokens_per_split = -(-tokens_per_split // TOKEN_ALIGN) * TOKEN_ALIGN
    count = max(-(-num_tokens // max(tokens_per_split, 1)), 1)
    bucket = 1 << max(tokens_per_split - 1, 0).bit_length()
    return TokenSplits(count, max(tokens_per_split, 1), min(max(bucket, TOKEN_ALIGN), 65536))


FP32_PRECISIONS = ("ieee", "tf32x3", "tf32")


def dot_precision(dtype: torch.dtype, fp32_precision: str = "ieee") -> str:
    """``tl.dot``'s ``input_precision`` for inputs of ``dtype``.

    fp32 inputs: ``fp32_precision``, by default ``"ieee"``: IEEE fp32 products as the
    reference's fp32 ``addmm`` (no tensor cores). ``"tf32x3"`` runs on tensor cores with
    three TF32 products per product (about 2⁻²⁰ relative error per product, ~16x fp32's
    rounding: not fp32 accuracy); ``"tf32"`` rounds each factor to 11 significant bits
    (2⁻¹¹ relative per product, exact only for inputs that fit in TF32, e.g. upcast
    bf16). 16-bit inputs: the flag does not apply (products of two bf16/fp16 values are
    exact in fp32); ``"tf32"`` is Triton's default.
    """
    if fp32_precision not in FP32_PRECISIONS:
        raise ValueError(f"fp32_precision must be one of {FP32_PRECISIONS}, got {fp32_precision!r}")
    return fp32_precision if dtype == torch.float32 else "tf32"


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
