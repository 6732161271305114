"""Backend switch (``kernels/dispatch.py``) and Triton launch policy (``kernels/triton_launch.py``),
and the two statistics backends end to end on the tiny Llama.

The end-to-end comparisons run the same model and data through ``stats_backend="torch"``
and ``"triton"`` (the interpreter on CPU); the torch backend is the oracle.
"""

from __future__ import annotations

import math

import pytest
import torch
from kernel_checks import INTERPRETING, import_triton_module

from lora_da.kernels import dispatch, kfac_stats, kfac_stats_cpu, triton_launch


@pytest.fixture(scope="module")
def kernels():
    return import_triton_module("kfac_stats_triton")


# ---------------------------------------------------------------------------------------
# select_backend
# ---------------------------------------------------------------------------------------
def test_select_backend_torch_cases():
    assert dispatch.select_backend("cpu", "auto").name == "torch"
    assert dispatch.select_backend("cpu", "torch").name == "torch"
    assert dispatch.select_backend("cuda", "torch", torch.bfloat16).name == "torch"
    assert dispatch.select_backend("cuda", "auto", torch.float64).name == "torch"
    with pytest.raises(ValueError, match="stats_backend"):
        dispatch.select_backend("cpu", "cuda")
    from lora_da.config import LoraDAConfig

    with pytest.raises(ValueError, match="stats_backend"):
        LoraDAConfig(stats_backend="cuda")


def test_select_backend_triton_cases(kernels):
    assert dispatch.select_backend("cuda", "auto", torch.bfloat16).name == "triton"
    assert dispatch.select_backend("cuda", "triton", torch.float32).name == "triton"
    with pytest.raises(TypeError, match="fp64"):
        dispatch.select_backend("cuda", "triton", torch.float64)
    if INTERPRETING:
        backend = dispatch.select_backend("cpu", "triton", torch.float32)
        assert backend.accumulate_input_factor is kernels.accumulate_input_factor
        assert backend.accumulate_output_statistics is kernels.accumulate_output_statistics
        assert backend.finalize_input_factor is kernels.finalize_input_factor


def test_cpu_backend_accumulates_the_lower_triangle():
    backend = dispatch.select_backend(torch.device("cpu"), "auto", torch.float32)
    assert backend.accumulate_input_factor is kfac_stats_cpu.accumulate_input_factor_lower
    assert backend.accumulate_output_statistics is kfac_stats.accumulate_output_statistics
    assert backend.finalize_input_factor is kfac_stats.mirror_lower_triangle


def test_select_backend_refuses_cpu_triton_without_interpreter(kernels, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="interpreter"):
        dispatch.select_backend("cpu", "triton", torch.float32)


def test_select_backend_refuses_interpreter_requested_too_late(kernels, monkeypatch):
    """TRITON_INTERPRET=1 now, but the kernels were defined compiled (INTERPRETING False)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(triton_launch, "INTERPRETING", False)
    with pytest.raises(RuntimeError, match="set it before"):
        dispatch.select_backend("cpu", "triton", torch.float32)


def test_select_backend_triton_needs_the_package(monkeypatch):
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    with pytest.raises(RuntimeError, match="needs the 'triton' package"):
        dispatch.select_backend("cuda", "triton", torch.float32)
    assert dispatch.select_backend("cuda", "auto", torch.bfloat16).name == "torch"


# ---------------------------------------------------------------------------------------
# triton_launch
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["1", "true", "ON", "y", "yes", "0", "false", "no", "", "2", " 1", "t"])
def test_interpreter_switch_reads_the_variable_as_triton_does(monkeypatch, value):
    triton = pytest.importorskip("triton")
    knobs = getattr(triton, "knobs", None)
    if knobs is None:  # pragma: no cover - triton < 3.4
        pytest.skip("this Triton has no triton.knobs to compare with")
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert triton_launch.interpreter_requested() == bool(knobs.runtime.interpret), value


def test_importing_the_library_does_not_read_the_switch():
    """INTERPRETING is read on triton_launch's first import, which must not happen when
    lora_da is imported (users set TRITON_INTERPRET after ``import lora_da``)."""
    import subprocess
    import sys

    code = "import sys, lora_da; print('lora_da.kernels.triton_launch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False", "importing lora_da imports lora_da.kernels.triton_launch"


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def test_statistics_configs():
    pytest.importorskip("triton")
    (only,) = triton_launch.statistics_configs(interpreting=True)
    assert only.kwargs == {"BLOCK_D": triton_launch.INTERPRETER_BLOCK, "BLOCK_T": triton_launch.INTERPRETER_BLOCK}
    gpu = triton_launch.statistics_configs(interpreting=False)
    assert len(gpu) == len(triton_launch.STATISTICS_TILES)
    seen = set()
    for config in gpu:
        blocks = (config.kwargs["BLOCK_D"], config.kwargs["BLOCK_T"])
        # tl.dot needs power-of-two tile sides of at least 16
        assert all(_power_of_two(b) and b >= 16 for b in blocks), config
        key = (*blocks, config.num_warps, config.num_stages)
        assert key not in seen, f"duplicate autotune configuration {key}"
        seen.add(key)


def test_dot_precision_never_tf32_for_fp32():
    # The interpreter ignores input_precision: only this and the CUDA tests see a change here.
    assert triton_launch.dot_precision(torch.float32) == "ieee"
    assert triton_launch.dot_precision(torch.float32, "tf32x3") == "tf32x3"


def test_autotune_pinned_by_the_variable_at_launch(monkeypatch):
    """``LORA_DA_TRITON_AUTOTUNE=0`` read when a key is tuned (not at import) keeps the pinned
    configuration alone; otherwise every configuration is timed."""
    pytest.importorskip("triton")
    gpu = triton_launch.statistics_configs(interpreting=False)
    assert triton_launch.PINNED_STATISTICS_TILE in triton_launch.STATISTICS_TILES
    monkeypatch.setenv("LORA_DA_TRITON_AUTOTUNE", "1")
    assert triton_launch.prune_statistics_configs(gpu, {}) == gpu
    for off in ("0", "off", " False "):
        monkeypatch.setenv("LORA_DA_TRITON_AUTOTUNE", off)
        (pinned,) = triton_launch.prune_statistics_configs(gpu, {})
        assert triton_launch._tile_of(pinned) == triton_launch.PINNED_STATISTICS_TILE
    other = [config for config in gpu if triton_launch._tile_of(config) != triton_launch.PINNED_STATISTICS_TILE]
    assert triton_launch.prune_statistics_configs(other, {}) == other[:1]


def test_kernels_autotune_keys_and_pruning(kernels):
    """Both statistics kernels are tuned per weights flag and token bucket (not only per
    d), and through the pruning hook that can pin them."""
    assert kernels._input_factor_kernel.keys == ["d_in", "token_bucket", "HAS_WEIGHTS"]
    assert kernels._output_statistics_kernel.keys == ["d_out", "d_in", "token_bucket", "HAS_WEIGHTS"]
    for kernel in (kernels._input_factor_kernel, kernels._output_statistics_kernel):
        assert kernel.early_config_prune is triton_launch.prune_statistics_configs


@pytest.mark.parametrize("interpreting", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_omega_blocks(dtype, interpreting):
    blocks = triton_launch.omega_blocks(dtype, interpreting=interpreting)
    assert blocks.use_dot == (dtype == torch.float32)
    assert _power_of_two(blocks.block_d) and _power_of_two(blocks.block_k)
    if blocks.use_dot:
        assert blocks.block_d >= 16 and blocks.block_k >= 16, "tl.dot needs tile sides >= 16"


# ---------------------------------------------------------------------------------------
# End to end: torch vs triton statistics backends on the tiny Llama
# ---------------------------------------------------------------------------------------
def _tiny_llama_init(stats_backend, device="cpu", dtype=torch.float32):
    import lora_da
    from lora_da.models import batches, synthetic_samples, tiny_llama

    model = tiny_llama(dtype=dtype).to(device)
    samples = synthetic_samples(8, seed=1)
    return lora_da.initialize(
        model,
        list(batches(samples, batch_size=4)),
        rank=4,
        train_size=100,
        token_mask="labels",  # holes: prompt tokens and padding
        progress=False,
        stats_backend=stats_backend,
    )


def _assert_same_init(got, expected, rtol):
    assert got.modules.keys() == expected.modules.keys()
    for name, module in expected.modules.items():
        other = got.modules[name]
        assert math.isclose(other.sigma, module.sigma, rel_tol=rtol), name
        for factor in ("lora_A", "lora_B"):
            a, b = getattr(other, factor).cpu(), getattr(module, factor).cpu()
            scale = b.abs().max()
            assert (a - b).abs().max() <= rtol * scale, f"{name}.{factor}"


def _tiny_llama_statistics(stats_backend, device="cpu"):
    from lora_da.models import batches, synthetic_samples, tiny_llama
    from lora_da.statistics_pass import collect_statistics
    from lora_da.targets import find_target_modules

    model = tiny_llama().to(device)
    modules = find_target_modules(model, None, 4)
    loader = list(batches(synthetic_samples(8, seed=1), batch_size=4))
    return collect_statistics(model, loader, modules, token_mask="labels", stats_backend=stats_backend)


def _assert_same_statistics(got, expected):
    # Identical activations and gradients, fp32 sums in another order: ~1e-7 relative;
    # 2e-5 of each statistic's largest entry leaves room for T ~ 100 additions.
    assert got.num_tokens == expected.num_tokens and got.num_samples == expected.num_samples
    for name in expected.modules:
        for what, a, b in (
            ("Z", got.input_factor(name), expected.input_factor(name)),
            ("y", got.output_factor_diag(name), expected.output_factor_diag(name)),
            ("G", got.gradient(name), expected.gradient(name)),
        ):
            assert (a - b).abs().max() <= 2e-5 * b.abs().max(), f"{name}: {what}"
    for group in got.groups:
        assert torch.equal(group.input_factor_sum, group.input_factor_sum.T), "Z not finalized"


@pytest.mark.skipif(not INTERPRETING, reason="CPU interpreter run; the CUDA variant is below")
def test_triton_statistics_match_torch_on_tiny_llama(kernels):
    reference = _tiny_llama_statistics("torch")
    got = _tiny_llama_statistics("triton")
    assert (reference.backend, got.backend) == ("torch", "triton")
    _assert_same_statistics(got, reference)


@pytest.mark.skipif(not INTERPRETING, reason="CPU interpreter run; the CUDA variant is below")
def test_initialize_triton_matches_torch_on_tiny_llama(kernels):
    reference = _tiny_llama_init("torch")
    got = _tiny_llama_init("triton")
    assert reference.backends["statistics"] == "torch"
    assert got.backends["statistics"] == "triton"
    # The statistics agree to ~1e-6 (test above); the factors go through Z⁻¹ and an
    # eigensolve, which amplify that by Z's condition number (o_proj inputs of the random
    # tiny model: ~1e3) and the eigen-gaps. 1e-2 relative is far below a real difference
    # (a wrong statistic changes the factors at O(1)).
    _assert_same_init(got, reference, rtol=1e-2)


@pytest.mark.cuda
def test_cuda_initialize_auto_uses_triton(kernels):
    reference = _tiny_llama_init("torch", device="cuda")
    got = _tiny_llama_init("auto", device="cuda")
    assert got.backends["statistics"] == "triton"
    _assert_same_statistics(_tiny_llama_statistics("auto", device="cuda"), _tiny_llama_statistics("torch", "cuda"))
    _assert_same_init(got, reference, rtol=1e-2)
