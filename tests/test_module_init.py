"""make_module_init (lora_da/module_init.py): the one place factors are finished — float32,
contiguous, and never NaN/Inf (refused by module name)."""

import pytest
import torch

from lora_da.module_init import ModuleInit, make_module_init


def test_factors_are_cast_to_float32_and_made_contiguous():
    generator = torch.Generator().manual_seed(0)
    a64 = torch.randn(6, 3, dtype=torch.float64, generator=generator).T  # 3 x 6, a transposed view
    b64 = torch.randn(4, 5, dtype=torch.float64, generator=generator)[:, ::2].T.contiguous().T  # 4 x 3, column-major
    assert not a64.is_contiguous() and not b64.is_contiguous()
    init = make_module_init("m.q_proj", a64, b64, torch.tensor([3.0, 2.0, 1.0], dtype=torch.float32), 3)
    assert isinstance(init, ModuleInit)
    for got, source in ((init.lora_A, a64), (init.lora_B, b64)):
        assert got.dtype == torch.float32 and got.is_contiguous()
        assert torch.equal(got, source.to(torch.float32))
    assert init.eigenvalues.dtype == torch.float64 and init.eigenvalues.device.type == "cpu"
    assert torch.equal(init.eigenvalues, torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))
    assert init.sigma == 3.0 and isinstance(init.sigma, float)
    assert init.rank == 3 and init.name == "m.q_proj"
    assert init.input_group == ("m.q_proj",)  # a group of its own by default
    assert init.variance_scale == 0.0 and init.damping == 0.0 and init.spectrum is None


def test_keywords_are_kept():
    init = make_module_init(
        "a", torch.ones(2, 3, dtype=torch.bfloat16), torch.ones(4, 2), torch.zeros(0), 1.5,
        variance_scale=0.25, damping=1e-3, input_group=("a", "b"),
    )
    assert init.lora_A.dtype == torch.float32
    assert (init.variance_scale, init.damping, init.input_group) == (0.25, 1e-3, ("a", "b"))
    assert init.eigenvalues.numel() == 0


@pytest.mark.parametrize("which", ["lora_A", "lora_B"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_factors_are_refused_by_module_name(which, bad):
    lora_A, lora_B = torch.ones(2, 3, dtype=torch.float64), torch.ones(4, 2, dtype=torch.float64)
    (lora_A if which == "lora_A" else lora_B)[1, 1] = bad
    with pytest.raises(FloatingPointError, match=r"LoRA factors of module 'model\.layers\.1\.mlp\.up_proj' are not finite"):
        make_module_init("model.layers.1.mlp.up_proj", lora_A, lora_B, torch.zeros(2), 1.0)


def test_a_float64_value_that_overflows_float32_is_refused():
    """Finite in float64, Inf once cast: the check runs on the float32 factors."""
    lora_A = torch.full((1, 2), 1e300, dtype=torch.float64)
    with pytest.raises(FloatingPointError, match="module 'big'"):
        make_module_init("big", lora_A, torch.ones(3, 1), torch.zeros(1), 1.0)
