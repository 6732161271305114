"""Shared by the kernel tests (tests/test_kernels_*.py): inputs, token masks, rounding
bounds and the Triton import guard.

Tolerances are bounds, not fitted numbers: a sum of ``n`` terms accumulated in
floating point of unit roundoff ``u`` is off by at most ``γ_n · Σ|terms|`` with
``γ_n = n·u/(1 − n·u)``, whatever the summation order (Higham, Thm 3.1). Each
test compares against a float64 computation on the *same* (already rounded)
inputs and states how many roundings each term can see.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from lora_da.kernels import triton_launch

INTERPRETING = triton_launch.INTERPRETING
DEVICE = "cpu" if INTERPRETING else "cuda"
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
