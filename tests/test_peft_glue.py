"""PEFT glue (lora_da/peft_glue.py): apply, save/load round trip, preserve_output, the base offset
of pissa/milora/lora-ga, per-layer ranks (rank_pattern); the files written (mode, atomicity,
reproducible adapter_config.json), task_type and GPT-2's fan_in_fan_out."""

import dataclasses
import json
import math
import os
import stat
import subprocess
import sys
import warnings

import pytest
import safetensors.torch
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import lora_da
from lora_da.models import tiny_llama
from lora_da.module_init import ModuleInit
from lora_da import peft_glue
from lora_da.peft_glue import get_peft_model_with_init, load_init_adapter, save_adapter, save_as_plain_lora

from cli_helpers import logits as logits_of_ids
from helpers import logits, product, tiny_gpt2

pytestmark = pytest.mark.filterwarnings("ignore:train_size not given")

RANK = 4


def make_init(data, **kwargs):
    return lora_da.initialize(tiny_llama(), data, rank=RANK, train_size=100, progress=False, **kwargs)


def peft_of(init, lora_alpha=16, dtype=torch.float32, **kwargs):
    model = tiny_llama(dtype=dtype)
    config = LoraConfig(r=RANK, lora_alpha=lora_alpha, target_modules=list(init.modules), **kwargs)
    return get_peft_model(model, config)


def test_apply_gives_w_x_plus_scaled_b_a_x(data):
    init = make_init(data)
    peft_model = peft_of(init, lora_alpha=16)
    init.apply(peft_model)
    name = "model.layers.1.mlp.down_proj"
    layer = dict(peft_model.named_modules())["base_model.model." + name]
    base = tiny_llama().get_submodule(name)  # an untouched copy of W
    x = torch.randn(5, base.in_features)
    m = init.modules[name]
    expected = x @ base.weight.T + (16 / RANK) * (x @ m.lora_A.T) @ m.lora_B.T
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    for n, mi in init.modules.items():
        lora_layer = dict(peft_model.named_modules())["base_model.model." + n]
        assert torch.equal(lora_layer.lora_A["default"].weight, mi.lora_A)
        assert torch.equal(lora_layer.lora_B["default"].weight, mi.lora_B)


def test_apply_keeps_lora_dtype(data):
    init = make_init(data)
    peft_model = peft_of(init, dtype=torch.bfloat16)
    for module in peft_model.modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            module.lora_A["default"].to(torch.bfloat16)
            module.lora_B["default"].to(torch.bfloat16)
    dtypes_before = {n: p.dtype for n, p in peft_model.named_parameters()}
    init.apply(peft_model)
    assert {n: p.dtype for n, p in peft_model.named_parameters()} == dtypes_before


def test_save_and_load_round_trip_identical_logits(data, tmp_path):
    init = make_init(data)
    applied = peft_of(init, lora_alpha=8)
    init.apply(applied)
    init.save_pretrained(str(tmp_path), lora_alpha=8)
    loaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    batch = data[0]
    assert torch.equal(logits(applied, batch), logits(loaded, batch))
    assert not torch.allclose(logits(loaded, batch), logits(tiny_llama(), batch))  # the adapter does something
    assert (tmp_path / "lora_da_init.json").exists()


def test_rslora_scaling_round_trip(data, tmp_path):
    init = make_init(data)
    applied = peft_of(init, lora_alpha=8, use_rslora=True)
    init.apply(applied)
    init.save_pretrained(str(tmp_path), lora_alpha=8, use_rslora=True)
    loaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    assert torch.equal(logits(applied, data[0]), logits(loaded, data[0]))
    layer = dict(applied.named_modules())["base_model.model.model.layers.0.self_attn.q_proj"]
    assert math.isclose(layer.scaling["default"], 8 / math.sqrt(RANK))


def test_preserve_output_leaves_logits_unchanged(data, tmp_path):
    init = make_init(data, preserve_output=True)
    peft_model = peft_of(init, lora_alpha=32)
    init.apply(peft_model)
    batch = data[1]
    torch.testing.assert_close(logits(peft_model, batch), logits(tiny_llama(), batch), rtol=1e-4, atol=1e-5)
    with peft_model.disable_adapter():  # the base weights did change
        assert not torch.allclose(logits(peft_model, batch), logits(tiny_llama(), batch), rtol=1e-4, atol=1e-5)
    # saved: the init's factors, for the offset base; load_init_adapter offsets the unmodified base
    init.save_pretrained(str(tmp_path), lora_alpha=32)
    loaded = load_init_adapter(tiny_llama(), str(tmp_path))
    torch.testing.assert_close(logits(loaded, batch), logits(peft_model, batch), rtol=1e-5, atol=1e-6)


def test_apply_checks_rank_and_names(data):
    init = make_init(data)
    wrong_rank = get_peft_model(tiny_llama(), LoraConfig(r=RANK + 1, target_modules=list(init.modules)))
    with pytest.raises(ValueError, match="do not match"):
        init.apply(wrong_rank)
    partial = get_peft_model(tiny_llama(), LoraConfig(r=RANK, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="k_proj' of this LoraInit has no matching PEFT LoRA layers"):
        init.apply(partial)
    with pytest.raises(ValueError, match="adapter 'other'"):
        init.apply(peft_of(init), adapter_name="other")


# -- methods that offset the base weight; per-layer ranks ----------------------------


@pytest.mark.parametrize("method", ["pissa", "milora", "lora-ga"])
def test_base_offset_methods_leave_the_output_unchanged(method, data, tmp_path):
    # fp32: W − s·B·A is rounded once per weight, so logits agree to ~1e-6 relative; rtol 1e-4 leaves room.
    init = lora_da.initialize(
        tiny_llama(), None if method != "lora-ga" else data, rank=RANK, progress=False, method=method
    )
    peft_model = get_peft_model_with_init(tiny_llama(), init, lora_alpha=16)
    batch = data[1]
    torch.testing.assert_close(logits(peft_model, batch), logits(tiny_llama(), batch), rtol=1e-4, atol=1e-5)
    with peft_model.disable_adapter():  # the base weights did change
        assert not torch.allclose(logits(peft_model, batch), logits(tiny_llama(), batch), rtol=1e-4, atol=1e-5)
    if method == "pissa":  # s·B·A is W's principal part whatever lora_alpha (factors ÷ √s)
        layer = dict(peft_model.named_modules())["base_model.model.model.layers.0.mlp.up_proj"]
        W = tiny_llama().get_submodule("model.layers.0.mlp.up_proj").weight.detach().double()
        u, s, vh = torch.linalg.svd(W, full_matrices=False)
        scaled = 4.0 * layer.lora_B["default"].weight.double() @ layer.lora_A["default"].weight.double()
        torch.testing.assert_close(scaled, u[:, :RANK] @ torch.diag(s[:RANK]) @ vh[:RANK], rtol=1e-5, atol=1e-6)
    # saved: the init's factors for the offset base; load_init_adapter applies the offset to the unmodified base
    init.save_pretrained(str(tmp_path), lora_alpha=16)
    loaded = load_init_adapter(tiny_llama(), str(tmp_path))
    torch.testing.assert_close(logits(loaded, batch), logits(peft_model, batch), rtol=1e-5, atol=1e-6)
    assert "offset" in init.report()["base_weight"] and "W - s*lora_B*lora_A" in init.summary()


def test_per_layer_ranks_round_trip_through_peft(data, tmp_path):
    init = lora_da.initialize(
        tiny_llama(), data, rank=8, progress=False, method="cntlora", method_options={"energy": 0.6}
    )
    assert len(set(init.ranks.values())) > 1
    applied = get_peft_model_with_init(tiny_llama(), init, lora_alpha=8)
    init.save_pretrained(str(tmp_path), lora_alpha=8)
    loaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    layers = dict(loaded.named_modules())
    for name, rank in init.ranks.items():
        layer = layers["base_model.model." + name]
        assert layer.lora_A["default"].weight.shape[0] == rank, name
        expected = product(init.modules[name])  # s·B·A = ΔW_k with s = 8/r_l per layer
        scaled = layer.scaling["default"] * layer.lora_B["default"].weight.double() @ layer.lora_A["default"].weight.double()
        torch.testing.assert_close(scaled, expected, rtol=1e-5, atol=1e-7)
    batch = data[0]
    assert torch.equal(logits(applied, batch), logits(loaded, batch))
    assert not torch.allclose(logits(loaded, batch), logits(tiny_llama(), batch))


# -- one-call wrapping and the plain-LoRA conversion ---------------------------------


def _tiny_loader():
    from lora_da.models import batches, synthetic_samples

    return list(batches(synthetic_samples(8, seed=5), 4))


def test_get_peft_model_with_init_matches_apply():
    loader = _tiny_loader()
    init = lora_da.initialize(tiny_llama(), loader, rank=RANK, train_size=100, progress=False)
    one_call = get_peft_model_with_init(tiny_llama(), init, lora_alpha=8, lora_dropout=0.0)
    manual = get_peft_model(tiny_llama(), LoraConfig(r=RANK, lora_alpha=8, target_modules=list(init.modules)))
    init.apply(manual)
    ids = loader[0]["input_ids"]
    assert torch.equal(logits_of_ids(one_call, ids), logits_of_ids(manual, ids))
    with pytest.raises(ValueError, match="comes from the LoraInit"):
        get_peft_model_with_init(tiny_llama(), init, r=2)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_preserve_output_converts_to_plain_lora_on_unmodified_base(tmp_path, use_rslora):
    loader = _tiny_loader()
    init = lora_da.initialize(tiny_llama(), loader, rank=RANK, train_size=100, preserve_output=True, progress=False)
    peft_model = get_peft_model_with_init(tiny_llama(), init, lora_alpha=8, use_rslora=use_rslora)
    ids = loader[1]["input_ids"]
    torch.testing.assert_close(logits_of_ids(peft_model, ids), logits_of_ids(tiny_llama(), ids), rtol=1e-4, atol=1e-5)
    # "train": move the adapter away from its init
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=generator))
    trained = logits_of_ids(peft_model, ids)
    assert not torch.allclose(trained, logits_of_ids(tiny_llama(), ids), atol=1e-3)
    save_as_plain_lora(peft_model, init, str(tmp_path))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == 2 * RANK
    loaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path))  # the *unmodified* base
    torch.testing.assert_close(logits_of_ids(loaded, ids), trained, rtol=1e-4, atol=1e-4)


# -- files: the umask's mode, atomic writes, reproducible bytes -------------------------


def _trained_preserve_output_model():
    init = lora_da.initialize(tiny_llama(), None, rank=RANK, progress=False, method="pissa")
    return init, get_peft_model_with_init(tiny_llama(), init, lora_alpha=8)


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600)])
def test_adapter_files_get_the_umask_mode(tmp_path, umask, mode):
    """Every file save_pretrained / save_as_plain_lora write has the mode ``0666 & ~umask``
    (safetensors alone writes the adapter 0600: unreadable to a group or another uid)."""
    init, peft_model = _trained_preserve_output_model()
    previous = os.umask(umask)
    try:
        init.save_pretrained(str(tmp_path / "init"), lora_alpha=8)
        save_as_plain_lora(peft_model, init, str(tmp_path / "plain"))
    finally:
        os.umask(previous)
    written = {
        "init": ["adapter_config.json", "adapter_model.safetensors", "lora_da_init.json"],
        "plain": ["adapter_config.json", "adapter_model.safetensors"],
    }
    for directory, names in written.items():
        assert sorted(os.listdir(tmp_path / directory)) == names  # no temporary file left behind
        for name in names:
            assert stat.S_IMODE(os.stat(tmp_path / directory / name).st_mode) == mode, (directory, name)


def test_saving_replaces_a_symlink_and_never_writes_through_it(tmp_path):
    init = lora_da.initialize(tiny_llama(), None, rank=RANK, progress=False, method="lora")
    outside = tmp_path / "someone_elses_file"
    outside.write_text("not ours")
    out = tmp_path / "adapter"
    out.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors", "lora_da_init.json"):
        (out / name).symlink_to(outside)
    init.save_pretrained(str(out))
    assert outside.read_text() == "not ours"
    assert not any(os.path.islink(out / name) for name in os.listdir(out))
    assert PeftModel.from_pretrained(tiny_llama(), str(out)) is not None


def test_a_failed_write_leaves_the_previous_adapter(tmp_path, monkeypatch):
    init = lora_da.initialize(tiny_llama(), None, rank=RANK, progress=False, method="lora")
    init.save_pretrained(str(tmp_path))
    before = (tmp_path / "adapter_model.safetensors").read_bytes()

    def fail(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        lora_da.initialize(tiny_llama(), None, rank=RANK, progress=False, method="lora", seed=1).save_pretrained(
            str(tmp_path)
        )
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors", "lora_da_init.json"]


def test_save_directory_that_is_a_file_is_refused(tmp_path):
    init = lora_da.initialize(tiny_llama(), None, rank=RANK, progress=False, method="lora")
    path = tmp_path / "adapter"
    path.write_text("a file")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        init.save_pretrained(str(path))
    assert path.read_text() == "a file"


_REPRODUCIBLE_SCRIPT = """
import hashlib, sys
import lora_da
from lora_da.models import tiny_llama
from lora_da.peft_glue import get_peft_model_with_init, save_as_plain_lora

out = sys.argv[1]
init = lora_da.initialize(tiny_llama(), None, rank=4, progress=False, method="pissa")
init.save_pretrained(out + "/init", lora_alpha=8)
save_as_plain_lora(get_peft_model_with_init(tiny_llama(), init, lora_alpha=8), init, out + "/plain")
for directory in ("init", "plain"):
    print(hashlib.md5(open(f"{out}/{directory}/adapter_config.json", "rb").read()).hexdigest())
"""


def test_adapter_config_is_byte_identical_across_processes(tmp_path):
    """PEFT keeps target_modules as a set and writes it in hash order: another order in every
    process (PYTHONHASHSEED). The files written here list them sorted."""
    package_root = os.path.dirname(lora_da.__path__[0])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([package_root, os.environ.get("PYTHONPATH", "")])}
    runs = {
        hash_seed: subprocess.Popen(
            [sys.executable, "-c", _REPRODUCIBLE_SCRIPT, str(tmp_path / hash_seed)],
            env={**env, "PYTHONHASHSEED": hash_seed},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for hash_seed in ("1", "2", "3")  # three fresh processes at once
    }
    digests = set()
    for hash_seed, run in runs.items():
        stdout, stderr = run.communicate(timeout=600)
        assert run.returncode == 0, stderr[-2000:]
        digests.add(tuple(stdout.split()))
        config = json.loads((tmp_path / hash_seed / "init" / "adapter_config.json").read_text())
        assert config["target_modules"] == sorted(config["target_modules"])
    assert len(digests) == 1, digests


# -- task_type, GPT-2's fan_in_fan_out --------------------------------------------------------


def test_task_type_is_recorded_and_loads_the_tasks_model_class(tmp_path):
    from peft import PeftModelForCausalLM

    init = lora_da.initialize(tiny_llama(), None, rank=RANK, progress=False, method="lora")
    save_adapter(init, str(tmp_path / "adapter"), task_type="CAUSAL_LM")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    loaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "adapter"))
    assert isinstance(loaded, PeftModelForCausalLM)
    lora_layers = {
        name for name, module in loaded.named_modules() if isinstance(getattr(module, "lora_A", None), torch.nn.ModuleDict)
    }
    assert lora_layers == {"base_model.model." + name for name in init.modules}  # exactly the init's modules
    assert isinstance(get_peft_model_with_init(tiny_llama(), init, task_type="CAUSAL_LM"), PeftModelForCausalLM)
    with pytest.raises(ValueError, match="Invalid task type"):  # PEFT's check, before anything is written
        save_adapter(init, str(tmp_path / "bad"), task_type="CAUSAL")
    assert not (tmp_path / "bad").exists()


def _fan_in_fan_out_warnings(caught):
    return [str(w.message) for w in caught if "fan_in_fan_out" in str(w.message)]


def test_gpt2_conv1d_adapters_say_fan_in_fan_out(tmp_path):
    """GPT-2's Conv1D stores W as d_in x d_out: PEFT needs fan_in_fan_out=True, and warns
    and corrects it on every layer when the config says False."""
    model = tiny_gpt2()
    init = lora_da.initialize(model, None, rank=RANK, progress=False, method="pissa")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = get_peft_model_with_init(tiny_gpt2(), init, lora_alpha=8)
    assert _fan_in_fan_out_warnings(caught) == []
    assert peft_model.peft_config["default"].fan_in_fan_out is True
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # pissa: the output is unchanged at init
        torch.testing.assert_close(peft_model(ids).logits, tiny_gpt2()(ids).logits, rtol=1e-4, atol=1e-4)
    save_adapter(init, str(tmp_path / "init"), lora_alpha=8, fan_in_fan_out=True)
    save_as_plain_lora(peft_model, init, str(tmp_path / "plain"))
    for directory in ("init", "plain"):
        assert json.loads((tmp_path / directory / "adapter_config.json").read_text())["fan_in_fan_out"] is True
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loaded = (load_init_adapter if directory == "init" else PeftModel.from_pretrained)(
                tiny_gpt2(), str(tmp_path / directory)
            )
        assert _fan_in_fan_out_warnings(caught) == [], directory
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids).logits, peft_model(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(
    "transposed_weight" not in {f.name for f in dataclasses.fields(ModuleInit)},
    reason="ModuleInit does not record transposed_weight yet (module_init.py / pipeline.py)",
)
def test_gpt2_init_records_fan_in_fan_out_without_being_told(tmp_path):
    init = lora_da.initialize(tiny_gpt2(), None, rank=RANK, progress=False, method="lora")
    assert peft_glue.init_fan_in_fan_out(init)
    init.save_pretrained(str(tmp_path))
    assert json.loads((tmp_path / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    assert not peft_glue.init_fan_in_fan_out(lora_da.initialize(tiny_llama(), None, rank=RANK, progress=False, method="lora"))
