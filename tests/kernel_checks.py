"""Shared by the kernel tests (tests/test_kernels_*.py): inputs, token masks, rounding
bounds, the Triton import guard, views with element offsets past 2³¹ and a child
process to run them in. On a GPU, importing it pins the statistics kernels' autotuning
to one configuration (``LORA_DA_TRITON_AUTOTUNE=0`` unless set).

Tolerances are bounds, not fitted numbers: a sum of ``n`` terms accumulated in
floating point of unit roundoff ``u`` is off by at most ``γ_n · Σ|terms|`` with
``γ_n = n·u/(1 − n·u)``, whatever the summation order (Higham, Thm 3.1). Each
test compares against a float64 computation on the *same* (already rounded)
inputs and states how many roundings each term can see.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from lora_da.kernels import triton_launch

INTERPRETING = triton_launch.INTERPRETING
DEVICE = "cpu" if INTERPRETING else "cuda"
if not INTERPRETING:
    # GPU runs: every new autotune key would compile and time all six configurations
    # (~300 compiles over the kernel tests); pinned, each kernel variant compiles once
    # (triton_launch.prune_statistics_configs reads this at launch).
    # test_every_gpu_tile_configuration still runs each configuration once.
    os.environ.setdefault("LORA_DA_TRITON_AUTOTUNE", "0")
UNIT_ROUNDOFF = {
    torch.float64: 2.0**-53,
    torch.float32: 2.0**-24,
    torch.float16: 2.0**-11,
    torch.bfloat16: 2.0**-8,
}
STATISTICS_INPUT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
MASK_KINDS = ["none", "holes", "masked_block", "fractional", "all_zero"]


def gamma(n: int, dtype=torch.float32) -> float:
    u = UNIT_ROUNDOFF[dtype]
    return n * u / (1 - n * u)


def random_inputs(num_tokens, dim, dtype, seed, scale=1.0, device=DEVICE):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, dim, generator=generator, dtype=torch.float64) * scale
    return x.to(dtype).to(device)


def token_mask(num_tokens, kind, seed, device=DEVICE):
    """Token weights (float32) of one of :data:`MASK_KINDS`:

    * ``none``: no weights;
    * ``holes``: 0/1 with random holes (~35% zeros);
    * ``masked_block``: holes and a fully masked run of 40 tokens (covers at least one
      whole token block of the interpreter's blocks of 32);
    * ``fractional``: the holes, other tokens weighted by a random value in (0, 2);
    * ``all_zero``: every token masked.
    """
    if kind == "none":
        return None
    if kind == "all_zero":
        return torch.zeros(num_tokens, device=device)
    generator = torch.Generator().manual_seed(seed + 1)
    mask = (torch.rand(num_tokens, generator=generator) > 0.35).to(torch.float32)
    if kind == "masked_block":
        mask[20:60] = 0
    elif kind == "fractional":
        mask = mask * (torch.rand(num_tokens, generator=generator) * 2)
    elif kind != "holes":
        raise ValueError(f"unknown mask kind {kind!r}")
    return mask.to(device)


def assert_within(actual, expected, bound, what):
    """``|actual − expected| <= bound`` elementwise; the message gives the worst ratio."""
    actual = actual.to(torch.float64).cpu()
    expected = expected.to(torch.float64).cpu()
    bound = bound.to(torch.float64).cpu() + 1e-30
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    excess = ((actual - expected).abs() / bound).max().item() if actual.numel() else 0.0
    assert excess <= 1.0, f"{what}: error reaches {excess:.3g} x the stated bound"


def _interpreter_works() -> bool:
    # Triton < 3.7's interpreter calls int() on 1-element arrays, which numpy >= 2.4 refuses.
    import numpy
    import triton

    def version(text):
        return tuple(int(part) for part in text.split(".")[:2] if part.isdigit())

    return version(triton.__version__) >= (3, 7) or version(numpy.__version__) < (2, 4)


def import_triton_module(name: str):
    """``lora_da.kernels.<name>``, or skip the calling test when Triton cannot run here."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("the Triton kernels need the 'triton' package")
    if INTERPRETING and not _interpreter_works():  # pragma: no cover - environment check
        import triton

        pytest.skip(f"the Triton {triton.__version__} interpreter does not run with numpy >= 2.4; install triton>=3.7")
    if not INTERPRETING and not torch.cuda.is_available():
        pytest.skip("the Triton kernels need a CUDA GPU or TRITON_INTERPRET=1")
    return importlib.import_module(f"lora_da.kernels.{name}")


WIDE_STRIDE = 2**30 + 64
"""A row stride whose multiples by 2 and 3 pass 2³¹ (not a power of two, so that a
wrapped int32 offset cannot land on the right element by accident)."""


def wide_rows(storage: torch.Tensor, num_rows: int, dim: int, offset: int, seed: int) -> torch.Tensor:
    """A ``num_rows x dim`` view with row stride :data:`WIDE_STRIDE` into ``storage``
    (from ``offset``), its rows filled with random values.

    ``storage`` is allocated with ``torch.empty`` and never touched elsewhere: the
    gigabytes between the rows stay virtual memory (only the written pages are resident),
    so element offsets past 2³¹ are exercised without allocating that much."""
    view = storage.as_strided((num_rows, dim), (WIDE_STRIDE, 1), offset)
    view.copy_(random_inputs(num_rows, dim, storage.dtype, seed, device=storage.device))
    return view


def wide_storage(num_rows: int, dim: int, dtype) -> torch.Tensor:
    """An uninitialized storage long enough for :func:`wide_rows` views of ``num_rows`` rows."""
    return torch.empty((num_rows - 1) * WIDE_STRIDE + 2 * dim, dtype=dtype)


def run_isolated(code: str, timeout: int = 300) -> str:
    """Run ``code`` in a fresh interpreter-mode Python (kernels imported there): a wrong
    address can crash the process, which then fails the calling test instead of the suite.
    Returns stdout; skips when the storage cannot be reserved (``MemoryError`` there)."""
    here = os.path.dirname(os.path.abspath(__file__))
    # the child imports the lora_da this process would (installed, or a development tree)
    package_root = os.path.dirname(os.path.dirname(importlib.util.find_spec("lora_da").origin))
    python_path = [package_root, here, os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(filter(None, python_path)))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode == 3:
        pytest.skip(f"could not reserve the virtual memory: {done.stdout.strip()}")
    assert done.returncode == 0, (
        f"child exited with {done.returncode} (negative: killed by that signal, e.g. -11 for an invalid address)\n"
        f"{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    )
    return done.stdout
