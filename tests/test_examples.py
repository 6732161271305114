"""examples/: the Trainer example runs as the README writes it."""

import os

import torch
from peft import PeftModel

from lora_da.models import tiny_llama


def test_trainer_example_runs_as_written(tmp_path):
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "examples", "trainer.py")
    spec = importlib.util.spec_from_file_location("trainer_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    result = example.main(["--tiny", "--out", str(tmp_path), "--max-steps", "3", "--rank", "4", "--calibration", "16"])
    assert result.global_step == 3 and torch.isfinite(torch.tensor(result.training_loss))
    loaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "adapter"))
    assert loaded.peft_config["default"].r == 4
