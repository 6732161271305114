"""``lora-da init`` (``lora_da.cli.init``) end to end: the adapter it writes, and bad input."""

import json
import os

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel

import lora_da
from lora_da import cli
from lora_da.cli.inputs import make_loader
from lora_da.data import encode_rows, read_jsonl
from lora_da.models import tiny_llama
from cli_helpers import RANK, init_args, logits, tiny_tokenizer, write_jsonl


# -- init end to end --------------------------------------------------------------------


def test_init_writes_adapter_that_loads_in_vanilla_peft(model_dir, data_file, tmp_path, capsys):
    out = tmp_path / "adapter"
    assert cli.main(init_args(model_dir, data_file, out)) == 0
    files = set(os.listdir(out))
    assert {"adapter_config.json", "adapter_model.safetensors", "lora_da_report.json"} <= files
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no temp dir left behind
    report = json.loads((out / "lora_da_report.json").read_text())
    assert report["rank"] == RANK and report["num_samples"] == 12 and report["train_size"] == 12
    assert "load model" in report["phases_s"]
    assert len(report["modules"]["model.layers.0.self_attn.q_proj"]["spectrum"]) == RANK + 4
    assert "wrote" in capsys.readouterr().out

    # The same init computed through the library, applied with LoraInit.apply.
    tokenizer = tiny_tokenizer()
    samples = encode_rows(read_jsonl(data_file), tokenizer, max_length=64)
    loader = make_loader(samples, tokenizer, 5)
    init = lora_da.initialize(tiny_llama(), loader, rank=RANK, train_size=12, progress=False)
    applied = get_peft_model(tiny_llama(), LoraConfig(r=RANK, lora_alpha=16, target_modules=list(init.modules)))
    init.apply(applied)
    loaded = PeftModel.from_pretrained(tiny_llama(), str(out))
    ids = loader[0]["input_ids"]
    torch.testing.assert_close(logits(loaded, ids), logits(applied, ids), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(logits(loaded, ids), logits(tiny_llama(), ids), atol=1e-4)
    if lora_da.report.have_matplotlib():
        assert {"lora_da_report.png", "lora_da_report.html"} <= files


def test_truncate_equals_direct_rank(model_dir, data_file):
    tokenizer = tiny_tokenizer()
    loader = make_loader(encode_rows(read_jsonl(data_file), tokenizer, max_length=64), tokenizer, 4)
    direct = lora_da.initialize(tiny_llama(), loader, rank=RANK, train_size=50, progress=False)
    wide = lora_da.initialize(tiny_llama(), loader, rank=RANK + 3, train_size=50, progress=False).truncate(RANK)
    assert wide.config.rank == RANK
    for name, m in direct.modules.items():
        torch.testing.assert_close(wide.modules[name].lora_A, m.lora_A, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(wide.modules[name].lora_B, m.lora_B, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(wide.modules[name].spectrum[:RANK], m.eigenvalues)
        assert wide.modules[name].spectrum.numel() == RANK + 3


# -- bad input: exit 2, one line, nothing written ------------------------------------------


def _bad_rows(tmp_path, lines):
    return write_jsonl(tmp_path / "bad.jsonl", lines)


BAD_CASES = {
    "missing model dir": (lambda tmp, model, data: (str(tmp / "nope"), data), "does not exist"),
    "not a model dir": (lambda tmp, model, data: (str(tmp), data), "no config.json"),
    "missing data file": (lambda tmp, model, data: (model, str(tmp / "nope.jsonl")), "does not exist"),
    "malformed line": (
        lambda tmp, model, data: (model, _bad_rows(tmp, ['{"text": "a cat"}', '{"text": "a dog"', '{"text": "x"}'])),
        "bad.jsonl:2: not valid JSON",
    ),
    "missing field": (
        lambda tmp, model, data: (model, _bad_rows(tmp, ['{"text": "a cat"}'] * 3 + ['{"prompt": "a cat"}'] + ['{"text": "a"}'] * 9)),
        "bad.jsonl:4: has 'prompt' but no 'response'",
    ),
    "unknown fields": (
        lambda tmp, model, data: (model, _bad_rows(tmp, ['{"content": "a cat"}'] * 12)),
        "bad.jsonl:1: needs a 'text'",
    ),
    "too few samples": (
        lambda tmp, model, data: (model, _bad_rows(tmp, ['{"text": "a big cat"}'] * 5)),
        "has 5 row(s) but --samples 12",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_exit_2_and_nothing_written(case, model_dir, data_file, tmp_path, capsys):
    make, message = BAD_CASES[case]
    model, data = make(tmp_path, model_dir, data_file)
    out = tmp_path / "out"
    assert cli.main(init_args(model, data, out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("lora-da: error:") and message in err[-1], err
    assert not out.exists()
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".out")]


def test_too_long_for_the_model_exit_2(model_dir, data_file, tmp_path, capsys):
    out = tmp_path / "out"
    args = init_args(model_dir, data_file, out)
    args[args.index("--max-length") + 1] = "1024"  # tiny_llama has 256 positions
    assert cli.main(args) == 2
    assert "longer than the model's 256 positions" in capsys.readouterr().err
    assert not out.exists()
    long_file = write_jsonl(tmp_path / "long.jsonl", [{"text": " ".join(["cat"] * 80)}] * 12)
    assert cli.main(init_args(model_dir, long_file, out, "--no-truncate")) == 2
    assert "long.jsonl:1: 81 tokens, longer than --max-length 64" in capsys.readouterr().err
    assert not out.exists()


# -- GPT-2 (Conv1D layers) -----------------------------------------------------------------


def tiny_gpt2():
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=128, n_positions=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=1, eos_token_id=2)
    return GPT2LMHeadModel(config).eval()


def test_init_on_gpt2_conv1d_writes_the_adapter_peft_loads(data_file, tmp_path):
    """GPT-2's layers are ``Conv1D`` (no ``in_features``): the report's extra eigenvalues
    are sized from ``lora_da.layers.linear_dims``, and the adapter holds the init's factors."""
    gpt2_dir = tmp_path / "tiny-gpt2"
    tiny_gpt2().save_pretrained(gpt2_dir)
    tiny_tokenizer().save_pretrained(gpt2_dir)
    out = tmp_path / "adapter"
    assert cli.main(init_args(str(gpt2_dir), data_file, out, "--no-visual")) == 0
    report = json.loads((out / "lora_da_report.json").read_text())
    assert len(report["modules"]["transformer.h.0.attn.c_attn"]["spectrum"]) == RANK + 4  # eigenvalues past r

    # The same init through the library: the adapter must hold exactly its factors.
    tokenizer = tiny_tokenizer()
    loader = make_loader(encode_rows(read_jsonl(data_file), tokenizer, max_length=64), tokenizer, 5)
    init = lora_da.initialize(tiny_gpt2(), loader, rank=RANK + 4, train_size=12, progress=False).truncate(RANK)
    assert {"transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_proj"} <= set(init.modules)
    loaded = PeftModel.from_pretrained(tiny_gpt2(), str(out))
    prefix = "base_model.model."
    layers = {
        name[len(prefix) :]: module
        for name, module in loaded.named_modules()
        if isinstance(getattr(module, "lora_A", None), torch.nn.ModuleDict) and "default" in module.lora_A
    }
    assert set(layers) == set(init.modules)
    for name, factors in init.modules.items():
        lora_a, lora_b = layers[name].lora_A["default"].weight, layers[name].lora_B["default"].weight
        torch.testing.assert_close(lora_a, factors.lora_A.to(lora_a.dtype), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(lora_b, factors.lora_B.to(lora_b.dtype), rtol=1e-5, atol=1e-7)
    assert set(load_file(str(out / "adapter_model.safetensors"))) == {
        f"{prefix}{name}.lora_{ab}.weight" for name in init.modules for ab in "AB"
    }


# -- the phase table ------------------------------------------------------------------------


def test_phase_table_adds_up_to_the_run_and_names_the_summary_total(model_dir, data_file, tmp_path, capsys):
    import re
    import time

    start = time.perf_counter()
    assert cli.main(init_args(model_dir, data_file, tmp_path / "adapter")) == 0
    wall = time.perf_counter() - start
    lines = capsys.readouterr().out.splitlines()
    summary_total = float(re.search(r"total (\d+\.\d+)s", next(l for l in lines if l.startswith("phases:"))).group(1))
    head = lines.index(next(l for l in lines if l.startswith("phase ")))
    rows = {}
    for line in lines[head + 1 :]:
        name, seconds = line[:15].strip(), float(line[15:25])
        rows[name] = seconds
        if name == "initialize":
            break
    total, initialize = rows.pop("total"), rows.pop("initialize")
    assert {"load model", "tokenize", "statistics", "factor prep", "solve", "init setup", "save", "write report"} == set(rows)
    assert abs(sum(rows.values()) - total) <= 0.005 * len(rows) + 1e-9  # the rows add up to the total
    assert abs(initialize - summary_total) <= 0.006  # the summary's total, printed as such
    inside = sum(rows[p] for p in ("statistics", "factor prep", "solve", "init setup"))
    assert abs(inside - initialize) <= 0.05 + 0.02 * initialize
    assert total <= wall + 0.01 and wall - total < 0.5 + 0.05 * wall  # the total is the run's wall time
