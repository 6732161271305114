"""Resumable statistics (lora_da/checkpoint.py): Ctrl-C and SIGKILL mid-pass resume to the
uninterrupted result; a checkpoint of another configuration or a corrupt one is refused."""

import os
import subprocess
import sys

import pytest
import torch

import lora_da
from lora_da.models import tiny_llama

import kill_worker
from helpers import assert_equal_inits, assert_same_fingerprint, model_fingerprint


def llama_data():
    return kill_worker.data()


def run(path, loader, **kwargs):
    return lora_da.initialize(
        tiny_llama(dtype=torch.float64), loader, rank=2, train_size=50, progress=False,
        stats_checkpoint=path, checkpoint_every=kwargs.pop("every", 1), **kwargs,
    )


def interrupted(at):
    for index, batch in enumerate(llama_data()):
        if index == at:
            raise KeyboardInterrupt
        yield batch


def test_ctrl_c_then_resume_gives_the_uninterrupted_result(tmp_path):
    path = tmp_path / "stats.ckpt"
    reference = lora_da.initialize(tiny_llama(dtype=torch.float64), llama_data(), rank=2, train_size=50, progress=False)
    model = tiny_llama(dtype=torch.float64)
    before = model_fingerprint(model)
    with pytest.raises(KeyboardInterrupt):
        lora_da.initialize(model, interrupted(3), rank=2, train_size=50, progress=False,
                           stats_checkpoint=str(path), checkpoint_every=2)
    assert_same_fingerprint(before, model_fingerprint(model))
    assert path.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".lora-da-stats-")]
    resumed = run(str(path), llama_data(), every=2)
    assert resumed.num_batches == 5 and resumed.num_samples == reference.num_samples
    assert_equal_inits(resumed, reference)
    again = run(str(path), llama_data())  # a finished pass is read back, not rerun
    assert_equal_inits(again, reference)


def test_killed_process_resumes_to_the_same_factors(tmp_path):
    path = tmp_path / "stats.ckpt"
    child = subprocess.run(
        [sys.executable, kill_worker.__file__, str(path)], cwd=os.path.dirname(kill_worker.__file__),
        capture_output=True, timeout=300,
    )
    assert child.returncode == -9, child.stderr.decode()[-2000:]
    assert path.exists()
    reference = lora_da.initialize(tiny_llama(dtype=torch.float64), llama_data(), rank=2, train_size=50, progress=False)
    resumed = run(str(path), llama_data())
    assert_equal_inits(resumed, reference)


def test_mismatched_or_corrupt_checkpoint_is_refused(tmp_path):
    path = tmp_path / "stats.ckpt"
    run(str(path), llama_data()[:2])
    with pytest.raises(ValueError, match=r"belongs to another configuration \(differs in: token_mask\)"):
        run(str(path), llama_data(), token_mask="labels")
    with pytest.raises(ValueError, match=r"differs in: modules"):
        run(str(path), llama_data(), target_modules=["q_proj"])
    record = torch.load(path, weights_only=False)
    payload = bytearray(record["payload"])
    payload[len(payload) // 2] ^= 0xFF
    record["payload"] = bytes(payload)
    torch.save(record, path)
    with pytest.raises(ValueError, match="corrupt"):
        run(str(path), llama_data())
