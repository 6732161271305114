"""Resumable statistics (lora_da/checkpoint.py): Ctrl-C and SIGKILL mid-pass resume to the
uninterrupted result; a checkpoint of another configuration, a corrupt, forged or hostile one is
refused without running code from it; the file is written with the user's umask."""

import copy
import hashlib
import json
import math
import os
import pickle
import stat
import subprocess
import sys
import time

import pytest
import torch

from safetensors import safe_open
from safetensors.torch import save_file

import lora_da
from lora_da.fingerprint import statistics_fingerprint
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
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # inside the last tensor
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt"):
        run(str(path), llama_data())
    path.write_bytes(bytes(data[:-7]))  # truncated
    with pytest.raises(ValueError, match="cannot be read as a lora-da-statistics/3 checkpoint"):
        run(str(path), llama_data())


# -- hostile and forged files ------------------------------------------------------------


class _RunsCode:
    """Unpickling this creates ``marker``: what a hostile pickle could do instead."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_a_pickle_is_refused_unread_and_runs_no_code(tmp_path):
    marker = tmp_path / "code-ran"
    for name, write in [
        ("zip", lambda f: torch.save({"format": "lora-da-statistics/1", "payload": _RunsCode(marker)}, f)),
        ("raw", lambda f: pickle.dump(_RunsCode(marker), f)),
    ]:
        path = tmp_path / f"{name}.ckpt"
        with open(path, "wb") as f:
            write(f)
        before = path.read_bytes()
        with pytest.raises(ValueError, match=r"stats\.ckpt|\.ckpt' is a torch\.save/pickle file.*never loaded"):
            run(str(path), llama_data())
        assert not marker.exists(), "loading the checkpoint ran code from the file"
        assert path.read_bytes() == before  # a file we did not write is left as found


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "cannot be read as a lora-da-statistics/3 checkpoint"),
        (b"some notes, not a checkpoint\n", "cannot be read as a lora-da-statistics/3 checkpoint"),
        ("safetensors", "is a safetensors file without a lora-da header"),
    ],
)
def test_a_file_that_is_not_a_checkpoint_is_refused_and_left_alone(tmp_path, content, message):
    path = tmp_path / "stats.ckpt"
    if content == "safetensors":
        save_file({"weight": torch.zeros(2)}, str(path))
    else:
        path.write_bytes(content)
    before = path.read_bytes()
    with pytest.raises(ValueError, match=f"statistics checkpoint '{path}' {message}"):
        run(str(path), llama_data())
    assert path.read_bytes() == before


def read_checkpoint(path):
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["lora_da"]), {key: f.get_tensor(key) for key in f.keys()}


def tensor_order(header):
    keys = [f"Z.{i}" for i in range(len(header["groups"]))]
    if not header["forward_only"]:
        keys += [f"{kind}.{j}" for j in range(len(header["modules"])) for kind in ("G", "y")]
    return keys


def canonical(value):
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def full_digest(header, tensors):
    """The documented digest: the header without sha256, NUL, then the tensors' bytes in order."""
    digest = hashlib.sha256(canonical({k: v for k, v in header.items() if k != "sha256"}).encode() + b"\0")
    for key in tensor_order(header):
        digest.update(tensors[key].contiguous().numpy().tobytes())
    return digest.hexdigest()


def write_checkpoint(path, header, tensors, text=None):
    save_file(tensors, str(path), metadata={"lora_da": canonical(header) if text is None else text})


def test_counts_forged_with_a_digest_of_the_payload_only_are_refused(tmp_path):
    path = tmp_path / "stats.ckpt"
    run(str(path), llama_data()[:2])
    header, tensors = read_checkpoint(path)
    header["counts"]["num_samples"] = 1000000
    payload = b"".join(tensors[key].numpy().tobytes() for key in tensor_order(header))
    header["sha256"] = hashlib.sha256(payload).hexdigest()  # the digest as format 1 computed it
    write_checkpoint(path, header, tensors)
    with pytest.raises(ValueError, match="corrupt"):
        run(str(path), llama_data())


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda h: h["counts"].update(num_tokens=h["counts"]["num_tokens"] + 1), "corrupt"),
        (lambda h: h["groups"][0]["members"].reverse(), "corrupt"),  # q, k, v share an input
        (lambda h: h.update(format="lora-da-statistics/1"), r"has format 'lora-da-statistics/1'"),
        (lambda h: h["fingerprint"].update(model="0" * 64), r"another configuration \(differs in: model\)"),
    ],
)
def test_an_edited_header_field_is_refused(tmp_path, edit, message):
    path = tmp_path / "stats.ckpt"
    run(str(path), llama_data()[:2])
    header, tensors = read_checkpoint(path)
    edit(header)  # the digest is left as it was
    write_checkpoint(path, header, tensors)
    with pytest.raises(ValueError, match=message):
        run(str(path), llama_data())


def test_a_header_not_in_canonical_form_is_refused(tmp_path):
    path = tmp_path / "stats.ckpt"
    run(str(path), llama_data()[:2])
    header, tensors = read_checkpoint(path)
    write_checkpoint(path, header, tensors, text=json.dumps(header, indent=1))
    with pytest.raises(ValueError, match="canonical"):
        run(str(path), llama_data())


def _set(tensors, key, value):
    tensors[key] = value


@pytest.mark.parametrize(
    "forge, message",
    [
        (lambda h, t: h["counts"].update(num_samples=-1), r"counts\.num_samples=-1, expected a non-negative int"),
        (lambda h, t: h["counts"].update(num_tokens=2.5), r"counts\.num_tokens=2\.5"),
        (lambda h, t: h["counts"].update(num_batches=True), r"counts\.num_batches=True"),
        (lambda h, t: h["counts"].update(skipped_batches=9), r"skipped_batches=9 > num_batches=2"),
        (lambda h, t: h.update(forward_only="no"), "forward_only='no'"),
        (lambda h, t: h["modules"].pop(), "does not list every target module exactly once"),
        (lambda h, t: h["modules"][0].update(group=1), "with group 1, but input groups list it in 0"),
        (lambda h, t: h["groups"][0]["members"].append("lm_head"), "'lm_head', not a target module"),
        (lambda h, t: h["groups"][0].update(num_tokens=-3), r"input group 0 with num_tokens=-3, expected a non-negative"),
        (lambda h, t: h["groups"][1].pop("num_tokens"), r"input group 1 = .*expected \{'members': \[names\], 'num_tokens'"),
        (lambda h, t: h["modules"][2].update(num_tokens=1.5), r"module '.*' with num_tokens=1\.5, expected a non-negative"),
        (lambda h, t: _set(t, "Z.0", t["Z.0"][:-1]), r"tensor 'Z\.0' of shape \[31, 32\], expected \[32, 32\]"),
        (lambda h, t: _set(t, "G.0", t["G.0"].float()), r"tensor 'G\.0' of another dtype"),
        (lambda h, t: _set(t, "Z.0", t["Z.0"].long()), "dtype I64, expected F32 or F64"),
        (lambda h, t: _set(t, "y.0", torch.full_like(t["y.0"], float("nan"))), r"NaN/Inf in tensor 'y\.0'"),
        (lambda h, t: _set(t, "extra", torch.zeros(1)), r"unexpected tensors \['extra'\]"),
        (lambda h, t: t.pop("G.3"), r"lacks tensor 'G\.3'"),
    ],
)
def test_every_field_is_validated_even_under_a_recomputed_digest(tmp_path, forge, message):
    """The digest can be recomputed by anyone: what keeps a forged file out is validation."""
    path = tmp_path / "stats.ckpt"
    run(str(path), llama_data()[:2])
    header, tensors = read_checkpoint(path)
    forge(header, tensors)
    try:
        header["sha256"] = full_digest(header, tensors)
    except KeyError:  # a tensor removed: any digest
        header["sha256"] = "0" * 64
    write_checkpoint(path, header, tensors)
    with pytest.raises(ValueError, match=f"statistics checkpoint '{path}' .*{message}"):
        run(str(path), llama_data())


def test_the_documented_digest_is_the_one_written(tmp_path):
    path = tmp_path / "stats.ckpt"
    run(str(path), llama_data()[:2])
    header, tensors = read_checkpoint(path)
    assert header["format"] == "lora-da-statistics/3" and header["counts"]["num_batches"] == 2
    assert full_digest(header, tensors) == header["sha256"]


# -- the fingerprint tells models apart ---------------------------------------------------


def test_a_model_differing_beyond_the_first_64_elements_is_refused(tmp_path):
    path = tmp_path / "stats.ckpt"
    run(str(path), llama_data()[:2])
    other = tiny_llama(dtype=torch.float64)
    weight = other.model.layers[1].mlp.down_proj.weight  # 32 x 64
    with torch.no_grad():
        weight.view(-1)[-1] += 1e-3  # one element, far beyond the first 64
    with pytest.raises(ValueError, match=r"belongs to another configuration \(differs in: model\)"):
        lora_da.initialize(other, llama_data(), rank=2, train_size=50, progress=False,
                           stats_checkpoint=str(path), checkpoint_every=1)


def test_the_fingerprint_sees_every_element_and_nothing_else():
    model = torch.nn.Sequential(torch.nn.Linear(300, 200), torch.nn.Linear(200, 10)).double()
    modules = {"0": model[0]}

    def fingerprint(m):
        return statistics_fingerprint(m, modules, "attention", None, "torch")

    reference = fingerprint(model)
    assert fingerprint(copy.deepcopy(model)) == reference
    for index in (0, 64, 12345, 59999):  # on and off the sampled grid, the last element
        other = copy.deepcopy(model)
        with torch.no_grad():
            flat = other[0].weight.view(-1)
            flat[index] = torch.nextafter(flat[index], torch.tensor(math.inf, dtype=torch.float64))  # one ulp
        assert fingerprint(other)["model"] != reference["model"], index
    other = copy.deepcopy(model).float()
    assert fingerprint(other)["model"] != reference["model"]  # dtype


# -- how the file is written ------------------------------------------------------------------


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_the_checkpoint_is_written_with_the_users_umask(tmp_path, umask, mode):
    path = tmp_path / "stats.ckpt"
    previous = os.umask(umask)
    try:
        run(str(path), llama_data()[:2])
    finally:
        os.umask(previous)
    assert stat.S_IMODE(os.stat(path).st_mode) == mode
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".lora-da-stats-")]


def test_only_our_own_stale_temporaries_are_removed(tmp_path):
    path = tmp_path / "stats.ckpt"
    run(str(path), llama_data()[:2])
    start = path.read_bytes()[:64]
    old = time.time() - 2 * 3600
    files = {
        ".lora-da-stats-stats.ckpt.0a1b2c3d.tmp": (start, old, False),  # ours, stale: removed
        ".lora-da-stats-stats.ckpt.deadbeef.tmp": (b"", old, False),  # ours, killed before writing
        ".lora-da-stats-stats.ckpt.12345678.tmp": (start, time.time(), True),  # ours but recent
        ".lora-da-stats-stats.ckpt.87654321.tmp": (b"not ours at all", old, True),  # not our content
        ".lora-da-stats-other.ckpt.0a1b2c3d.tmp": (start, old, True),  # another checkpoint's
        ".lora-da-stats-stats.ckpt.rank0.0a1b2c3d.tmp": (start, old, True),  # another checkpoint's
        ".lora-da-stats-abc12345": (start, old, True),  # the old naming
        "notes.txt": (b"x", old, True),
    }
    for name, (content, mtime, _) in files.items():
        (tmp_path / name).write_bytes(content)
        os.utime(tmp_path / name, (mtime, mtime))
    run(str(path), llama_data()[:2])
    for name, (content, _, kept) in files.items():
        assert (tmp_path / name).exists() == kept, name
        if kept:
            assert (tmp_path / name).read_bytes() == content, name


# -- writing streams the payload ----------------------------------------------------------

SAVE_RSS_SCRIPT = r"""
import os, resource, sys, torch
from lora_da import checkpoint
from lora_da.memory_peaks import current_rss, peak_rss
n, count = 2048, 4   # 16 MiB per tensor, 8 of them + y: 128 MiB of payload
state = {
    "groups": [((f"m{i}",), torch.rand(n, n), 1) for i in range(count)],
    "modules": [(f"m{i}", i, torch.rand(n, n), torch.rand(n), 1) for i in range(count)],
    "counts": (1, 1, 1, 0, 0), "forward_only": False,
}
small = {"groups": [(("m",), torch.rand(8, 8), 1)], "modules": [("m", 0, torch.rand(8, 8), torch.rand(8), 1)],
         "counts": (1, 1, 1, 0, 0), "forward_only": False}
checkpoint.StatisticsCheckpoint(sys.argv[1] + ".small", 1, {}).save(small)  # imports, buffers
start = max(current_rss(), peak_rss())
checkpoint.StatisticsCheckpoint(sys.argv[1], 1, {"modules": [[f"m{i}", n, n] for i in range(count)]}).save(state)
print((peak_rss() - start) / 2**20)
"""


def test_a_save_reads_each_tensor_once_and_holds_no_copy_of_the_payload(tmp_path, monkeypatch):
    """The payload is streamed: each tensor read (hashed and written) once, and a save of
    128 MiB adds under 24 MiB to the process's peak RSS (a copy of the payload would add 128),
    in a fresh process; the file reads back and validates."""
    from lora_da import checkpoint

    path = str(tmp_path / "stats.safetensors")
    run(path, llama_data())
    header, tensors = read_checkpoint(path)
    saver = checkpoint.StatisticsCheckpoint(path, 1, header["fingerprint"])
    state = saver.load(torch.device("cpu"))
    reads = []
    real = checkpoint._tensor_bytes
    monkeypatch.setattr(checkpoint, "_tensor_bytes", lambda tensor: reads.append(tensor.shape) or real(tensor))
    saver.save(state)
    assert len(reads) == len(tensors) > 0
    again, again_tensors = read_checkpoint(path)
    assert again == header and full_digest(again, again_tensors) == again["sha256"]
    assert saver.load(torch.device("cpu"))["counts"] == state["counts"]  # validated on reading

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    done = subprocess.run([sys.executable, "-c", SAVE_RSS_SCRIPT, str(tmp_path / "big.safetensors")],
                          capture_output=True, text=True, env=env, check=True, timeout=120)
    assert float(done.stdout.split()[-1]) < 24
