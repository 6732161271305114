"""The registry (lora_da/methods/__init__.py): METHODS, get_method, resolve_options and their errors."""

import dataclasses

import pytest

import lora_da
from lora_da.methods import METHODS, get_method, resolve_options
from lora_da.methods import cntlora, lora_ga, lora_one
from lora_da.methods.base import FORWARD_STATISTICS, FULL_STATISTICS, NO_STATISTICS, NoOptions
from lora_da.models import tiny_llama

from helpers import ALL_METHODS


def test_bad_method_name_lists_the_valid_ones(data):
    with pytest.raises(ValueError, match="method must be one of 'lora-da', 'lora', 'pissa'.*'fisher-subspace'"):
        lora_da.initialize(tiny_llama(), data, method="loraga")
    with pytest.raises(ValueError, match="has no option 'gamma_s'"):
        lora_da.initialize(tiny_llama(), data, method="lora-ga", method_options={"gamma_s": 2})


def test_every_method_is_registered_under_its_name_in_order():
    assert tuple(METHODS) == ALL_METHODS
    for name, method in METHODS.items():
        assert get_method(name) is method and method.name == name
    # what each reads (the driver plans its passes from this)
    assert {name for name, m in METHODS.items() if m.statistics == NO_STATISTICS} == {"lora", "pissa", "milora"}
    assert {name for name, m in METHODS.items() if m.statistics == FORWARD_STATISTICS} == {"cntlora"}
    assert {name for name, m in METHODS.items() if m.statistics == FULL_STATISTICS} == {
        "lora-da", "lora-ga", "lora-one", "fisher-subspace"
    }
    assert [name for name, m in METHODS.items() if m.uses_train_size] == ["lora-da"]


@pytest.mark.parametrize("name", ["loraga", "LoRA-DA", "", None, 3])
def test_get_method_refuses_unknown_names_listing_the_valid_ones(name):
    with pytest.raises(ValueError, match=r"method must be one of 'lora-da', 'lora', .*'fisher-subspace'; got"):
        get_method(name)


def test_resolve_options_merges_into_the_defaults():
    assert resolve_options("lora-ga", None) == lora_ga.LoraGAOptions(stable_gamma=16.0)
    assert resolve_options("lora-one", {}) == lora_one.LoraOneOptions(stable_gamma=64.0)
    options = resolve_options("cntlora", {"energy": 1})
    assert options == cntlora.CntLoraOptions(energy=1.0, shrinkage=0.1)
    assert isinstance(options.energy, float)  # ints are taken as floats
    assert resolve_options("lora-da", None) == NoOptions()
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.energy = 0.5


@pytest.mark.parametrize(
    "method,options,match",
    [
        ("lora-ga", {"gamma_s": 2}, r"method 'lora-ga' has no option 'gamma_s' \(its options: stable_gamma\)"),
        ("lora-da", {"stable_gamma": 2}, r"method 'lora-da' has no option 'stable_gamma' \(its options: none\)"),
        ("lora-ga", {"stable_gamma": True}, "method option 'stable_gamma' must be a finite number, got True"),
        ("lora-ga", {"stable_gamma": "16"}, "must be a finite number, got '16'"),
        ("lora-ga", {"stable_gamma": float("inf")}, "must be a finite number, got inf"),
        ("lora-one", {"stable_gamma": float("nan")}, "must be a finite number, got nan"),
        ("lora-ga", {"stable_gamma": 0}, "stable_gamma must be > 0, got 0.0"),
        ("lora-one", {"stable_gamma": -1}, "stable_gamma must be > 0"),
        ("cntlora", {"energy": 0}, r"energy must lie in \(0, 1\]"),
        ("cntlora", {"energy": 1.5}, r"energy must lie in \(0, 1\]"),
        ("cntlora", {"shrinkage": 0}, r"shrinkage must lie in \(0, 1\]"),
        ("nope", None, "method must be one of"),
    ],
)
def test_resolve_options_errors(method, options, match):
    with pytest.raises(ValueError, match=match):
        resolve_options(method, options)
