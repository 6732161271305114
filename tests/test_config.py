"""LoraDAConfig (lora_da/config.py): the defaults, the method's options, and every validation error
(raised when the config is made, before any model is touched)."""

import dataclasses

import pytest
import torch

from lora_da import LoraDAConfig
from lora_da.methods.lora_ga import LoraGAOptions


def test_defaults_are_the_published_ones():
    config = LoraDAConfig()
    assert (config.rank, config.alpha, config.beta, config.gamma, config.damping) == (8, 1.0, 0.03, 1024.0, 1e-6)
    assert config.method == "lora-da" and config.solver == "auto" and config.token_mask == "attention"
    assert config.train_size is None and config.max_memory is None and config.checkpoint_every == 50
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.rank = 4


def test_options_are_the_methods_dataclass():
    assert LoraDAConfig(method="lora-ga").options == LoraGAOptions()
    assert LoraDAConfig(method="lora-ga", method_options={"stable_gamma": 4}).options == LoraGAOptions(4.0)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(rank=1, alpha=0.0, beta=0.0, gamma=1e-3, damping=1e-30),
        dict(train_size=1, max_batches=1, gather_to=0, checkpoint_every=1),
        dict(max_memory=1, solver="eigh", stats_backend="torch"),
        dict(max_memory=1.0, token_mask=None),
        dict(max_memory=1e-6, token_mask="all"),
        dict(token_mask="labels", loss_fn=lambda model, batch: None),
        dict(token_mask=lambda batch: None),
        dict(method="cntlora", method_options={"energy": 0.5}),
        dict(seed=0),
        dict(seed=2**64 - 1),
    ],
)
def test_valid_configs_are_accepted(kwargs):
    LoraDAConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(rank=0), "rank must be a positive int, got 0"),
        (dict(rank=True), "rank must be a positive int, got True"),
        (dict(rank=2.0), "rank must be a positive int, got 2.0"),
        (dict(alpha=float("nan")), "alpha must be a finite number, got nan"),
        (dict(beta=float("inf")), "beta must be a finite number"),
        (dict(gamma="1"), "gamma must be a finite number"),
        (dict(beta=-0.1), "beta must be >= 0"),
        (dict(gamma=0.0), "gamma must be > 0"),
        (dict(damping=0.0), "damping must be > 0"),
        (dict(damping=-1.0), "damping must be > 0"),
        (dict(train_size=0), "train_size must be a positive int or None"),
        (dict(train_size=10.0), "train_size must be a positive int or None"),
        (dict(train_size=True), "train_size must be a positive int or None, got True"),
        (dict(max_batches=0), "max_batches must be a positive int or None"),
        (dict(max_batches=True), "max_batches must be a positive int or None, got True"),
        (dict(token_mask="bogus"), "token_mask must be one of"),
        (dict(token_mask=3), "token_mask must be a string, None or a callable"),
        (dict(stats_backend="cuda"), "stats_backend must be 'auto', 'torch' or 'triton'"),
        (dict(solver="lobpcg"), "solver must be 'auto' or 'eigh'"),
        (dict(gather_to=-1), "gather_to must be a rank"),
        (dict(checkpoint_every=0), "checkpoint_every must be a positive int"),
        (dict(checkpoint_every=True), "checkpoint_every must be a positive int, got True"),
        (dict(gather_to=False), "gather_to must be a rank"),
        (dict(max_memory=0), "max_memory must be a positive number of bytes"),
        (dict(max_memory=-5), "max_memory must be a positive number of bytes"),
        (dict(max_memory=0.0), r"max_memory as a float is a fraction of free memory in \(0, 1\]"),
        (dict(max_memory=1.5), r"max_memory as a float is a fraction"),
        (dict(max_memory="1GB"), "max_memory must be bytes"),
        (dict(max_memory=True), "max_memory must be bytes"),
        (dict(loss_fn=3), "loss_fn must be callable"),
        (dict(seed=-1), r"^seed must be an int in \[0, 2\*\*64 - 1\], got -1$"),
        (dict(seed=2**64), r"^seed must be an int in \[0, 2\*\*64 - 1\], got 18446744073709551616$"),
        (dict(seed=True), r"^seed must be an int in \[0, 2\*\*64 - 1\], got True$"),
        (dict(seed=1.0), r"^seed must be an int in \[0, 2\*\*64 - 1\], got 1.0$"),
        (dict(seed="0"), r"^seed must be an int in \[0, 2\*\*64 - 1\], got '0'$"),
        (dict(method="loraga"), "method must be one of"),
        (dict(method="lora-ga", method_options={"gamma_s": 2}), "has no option 'gamma_s'"),
        (dict(method="cntlora", method_options={"energy": 2}), r"energy must lie in \(0, 1\]"),
    ],
)
def test_invalid_configs_are_refused_by_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoraDAConfig(**kwargs)


@pytest.mark.parametrize("seed", [-1, 2**64])
def test_a_bad_seed_is_refused_before_the_statistics_pass(seed):
    """initialize(seed=-1) used to run the whole statistics pass and then fail in the solver."""
    import lora_da
    from lora_da.models import tiny_llama

    class Untouchable:
        def __iter__(self):
            raise AssertionError("the loader was read")

    model = tiny_llama()
    before = {name: p.detach().clone() for name, p in model.state_dict().items()}
    with pytest.raises(ValueError, match="^seed must be an int in"):
        lora_da.initialize(model, Untouchable(), rank=2, train_size=10, progress=False, seed=seed)
    assert all(torch.equal(before[name], p) for name, p in model.state_dict().items())
