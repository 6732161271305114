"""The ``--out`` directory (``lora_da.cli.output``): what may be replaced, the checks
before any work, and the atomic swap (kills included)."""

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from lora_da import cli
from lora_da.cli import output
from lora_da.cli.errors import UsageError
from lora_da.cli.output import MARKER_NAME, REPLACE_OWN_OUTPUT, AtomicDirectory, check_out
from cli_helpers import init_args


def snapshot(root):
    """Every path under ``root`` with its bytes (links as their target): to check that nothing changed."""
    found = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(directory, name)
            rel = os.path.relpath(path, root)
            if os.path.islink(path):
                found[rel] = "-> " + os.readlink(path)
            elif os.path.isfile(path):
                with open(path, "rb") as f:
                    found[rel] = f.read()
            else:
                found[rel] = "dir"
    return found


def one_error_line(capsys, *needles):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lora-da: error:"), err
    for needle in needles:
        assert needle in err[0], err
    return err[0]


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if the model is loaded: --out must be refused before."""

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr("lora_da.cli.init.load_model_and_tokenizer", load)


@pytest.fixture
def layout(model_dir, data_file, tmp_path):
    """tmp/work/{model/, train.jsonl, notes.txt, sub/train.jsonl}, tmp/link-parent -> work,
    tmp/elsewhere/alias.jsonl -> work/train.jsonl: the user's files, to be left as they are."""
    work = tmp_path / "work"
    shutil.copytree(model_dir, work / "model")
    shutil.copy(data_file, work / "train.jsonl")
    (work / "notes.txt").write_text("mine")
    (work / "sub").mkdir()
    shutil.copy(data_file, work / "sub" / "train.jsonl")
    os.symlink(work, tmp_path / "link-parent")
    (tmp_path / "elsewhere").mkdir()
    os.symlink(work / "train.jsonl", tmp_path / "elsewhere" / "alias.jsonl")
    return tmp_path


def write_output(target, files, command="lora-da init"):
    """An output directory as lora-da writes it (marker included), through AtomicDirectory."""
    staging = AtomicDirectory(str(target), command=command)
    for name, text in files.items():
        with open(os.path.join(staging.path, name), "w") as f:
            f.write(text)
    staging.commit()


# -- what --overwrite may replace -------------------------------------------------------------


def test_overwrite_replaces_only_an_earlier_output(model_dir, data_file, tmp_path, capsys):
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert cli.main(init_args(model_dir, data_file, out)) == 2
    one_error_line(capsys, "exists and is not empty", "--overwrite")
    # --overwrite does not replace a directory lora-da did not write
    assert cli.main(init_args(model_dir, data_file, out, "--overwrite", "--no-visual")) == 2
    one_error_line(capsys, "is not an earlier lora-da output", MARKER_NAME)
    assert os.listdir(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"

    # a new --out gets the marker, which names every file written
    out = tmp_path / "fresh"
    assert cli.main(init_args(model_dir, data_file, out, "--no-visual")) == 0
    marker = json.loads((out / MARKER_NAME).read_text())
    assert marker["command"] == "lora-da init" and marker["complete"] is True and marker["version"]
    assert set(marker["files"]) | {MARKER_NAME} == set(os.listdir(out))
    assert cli.main(init_args(model_dir, data_file, out, "--overwrite", "--no-visual")) == 0
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]

    # a file the user added to the output makes it theirs: refused
    (out / "trainer_state.json").write_text("{}")
    before = snapshot(out)
    assert cli.main(init_args(model_dir, data_file, out, "--overwrite", "--no-visual")) == 2
    one_error_line(capsys, "holds trainer_state.json, which lora-da did not write")
    assert snapshot(out) == before
    os.remove(out / "trainer_state.json")
    (out / "checkpoint-10").mkdir()  # a directory too, even one named like ours
    assert cli.main(init_args(model_dir, data_file, out, "--overwrite", "--no-visual")) == 2
    one_error_line(capsys, "checkpoint-10")


def test_an_output_of_an_earlier_version_without_marker_is_replaced(tmp_path):
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors", "lora_da_report.json", "lora_da_init.json"):
        (legacy / name).write_text("{}")
    check_out(str(legacy), True)
    check_out(str(legacy), REPLACE_OWN_OUTPUT)
    (legacy / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="not an earlier lora-da output"):
        check_out(str(legacy), REPLACE_OWN_OUTPUT)
    with pytest.raises(UsageError, match="is a file"):
        check_out(str(legacy / "notes.txt"), False)


def test_an_empty_directory_is_used(model_dir, data_file, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    assert cli.main(init_args(model_dir, data_file, out, "--no-visual")) == 0
    assert "adapter_config.json" in os.listdir(out)


# -- item 2: --out may not be (or hold) the current, model or data directory -------------------


MODEL = "<the model fixture, outside tmp>"


@pytest.mark.parametrize(
    "cwd, model, data, out, message",
    [
        ("work", "model", "train.jsonl", ".", "is the current directory"),
        ("work", "model", "train.jsonl", "model", "is the model directory"),
        ("work", "model", "train.jsonl", "model/adapter", "is inside the model directory"),
        ("work", "model", "train.jsonl", "../link-parent/model", "is the model directory"),  # a linked parent
        ("work/sub", "../model", "../train.jsonl", "..", "contains the current directory"),
        ("elsewhere", MODEL, "../work/train.jsonl", "../work", "is the data file's directory"),
        ("elsewhere", MODEL, "alias.jsonl", "../work", "is the data file's directory"),  # a linked data file
        ("elsewhere", MODEL, "../work/sub/train.jsonl", "../work", "contains the data file's directory"),
    ],
)
def test_out_over_the_inputs_is_refused_and_nothing_changes(
    cwd, model, data, out, message, layout, model_dir, monkeypatch, capsys, no_loading
):
    monkeypatch.chdir(layout / cwd)
    model = model_dir if model == MODEL else model
    before = snapshot(layout)
    assert cli.main(init_args(model, data, out, "--overwrite")) == 2
    one_error_line(capsys, message, "choose")
    assert snapshot(layout) == before


# -- item 3: an unusable --out is refused before the model is loaded ------------------------------


def test_dangling_symlink_out_is_refused_before_loading(model_dir, data_file, tmp_path, capsys, no_loading):
    out = tmp_path / "out"
    os.symlink(tmp_path / "nowhere", out)
    assert cli.main(init_args(model_dir, data_file, out)) == 2
    one_error_line(capsys, "is a broken symbolic link")
    assert os.path.islink(out) and not (tmp_path / "nowhere").exists()


def test_out_under_a_file_is_refused_before_loading(model_dir, data_file, tmp_path, capsys, no_loading):
    (tmp_path / "file").write_text("x")
    assert cli.main(init_args(model_dir, data_file, tmp_path / "file" / "out")) == 2
    one_error_line(capsys, "is not a directory")
    assert cli.main(init_args(model_dir, data_file, tmp_path / "file")) == 2
    one_error_line(capsys, "is a file")


def test_unwritable_parent_is_refused_before_loading(model_dir, data_file, tmp_path, monkeypatch, capsys, no_loading):
    parent = tmp_path / "ro"
    parent.mkdir()
    real_mkdtemp = output.tempfile.mkdtemp

    def read_only(*args, dir=None, **kwargs):  # a read-only file system (chmod does not stop root)
        if dir and os.path.realpath(dir).startswith(str(parent)):
            raise OSError(errno.EROFS, "Read-only file system")
        return real_mkdtemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(output.tempfile, "mkdtemp", read_only)
    assert cli.main(init_args(model_dir, data_file, parent / "out")) == 2
    one_error_line(capsys, "cannot create a directory in", "Read-only file system")
    assert cli.main(init_args(model_dir, data_file, parent / "a" / "b" / "out")) == 2  # parents to create
    one_error_line(capsys, "Read-only file system")
    assert os.listdir(parent) == []

    real_access = os.access
    def no_access(path, mode, **kwargs):
        return False if str(tmp_path) in str(path) else real_access(path, mode, **kwargs)

    monkeypatch.setattr(output.os, "access", no_access)
    assert cli.main(init_args(model_dir, data_file, tmp_path / "out")) == 2
    one_error_line(capsys, "permission denied")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_parent_is_refused_before_loading(model_dir, data_file, tmp_path, capsys, no_loading):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        assert cli.main(init_args(model_dir, data_file, parent / "out")) == 2
        one_error_line(capsys, "cannot write in")
    finally:
        parent.chmod(0o755)


# -- item 4: the swap, links and what kills leave ------------------------------------------------


def test_symlinked_out_is_refused_and_left_as_is(model_dir, data_file, tmp_path, capsys, no_loading):
    real = tmp_path / "real"
    write_output(real, {"adapter_config.json": "old"})
    link = tmp_path / "link"
    os.symlink(real, link)
    before = snapshot(tmp_path)
    for out in (str(link), str(link) + "/"):
        assert cli.main(init_args(model_dir, data_file, out, "--overwrite")) == 2
        one_error_line(capsys, "is a symbolic link", "pass the directory itself")
    assert snapshot(tmp_path) == before


def test_atomic_directory_commit_replaces_and_discard_leaves_nothing(tmp_path):
    target = tmp_path / "out"
    write_output(target, {"old.txt": "old"})
    staging = AtomicDirectory(str(target))
    (tmp_path / os.path.basename(staging.path) / "new.txt").write_text("new")
    assert sorted(os.listdir(target)) == [MARKER_NAME, "old.txt"]  # untouched until commit
    staging.commit()
    assert sorted(os.listdir(target)) == [MARKER_NAME, "new.txt"] and os.listdir(tmp_path) == ["out"]
    staging = AtomicDirectory(str(target))
    staging.discard()
    assert sorted(os.listdir(target)) == [MARKER_NAME, "new.txt"] and os.listdir(tmp_path) == ["out"]


def test_output_has_the_users_umask(tmp_path):
    umask = os.umask(0o027)
    try:
        write_output(tmp_path / "out", {"a.json": "{}"})
    finally:
        os.umask(umask)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o750
    assert (tmp_path / "out" / MARKER_NAME).stat().st_mode & 0o777 == 0o640


def test_commit_refuses_an_out_that_became_foreign_during_the_run(tmp_path):
    target = tmp_path / "out"
    staging = AtomicDirectory(str(target))
    target.mkdir()
    (target / "keep.txt").write_text("mine")  # someone wrote there meanwhile
    with pytest.raises(UsageError, match="changed during the run"):
        staging.commit()
    staging.discard()
    assert os.listdir(target) == ["keep.txt"] and os.listdir(tmp_path) == ["out"]


def test_exchange_swaps_two_directories_atomically(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x").write_text("a")
    (tmp_path / "b").mkdir()
    if not output.exchange(str(tmp_path / "a"), str(tmp_path / "b")):
        pytest.skip("no renameat2(RENAME_EXCHANGE) here: the two-rename swap is used")
    assert os.listdir(tmp_path / "b") == ["x"] and os.listdir(tmp_path / "a") == []


def test_failed_second_rename_puts_the_old_output_back(model_dir, data_file, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    write_output(out, {"adapter_config.json": "old"})
    monkeypatch.setattr(output, "exchange", lambda a, b: False)  # the two-rename swap
    real_replace = os.replace
    calls = []

    def replace(src, dst):
        calls.append(src)
        if output.TMP_TAG in os.path.basename(src):  # the new output's rename into place
            raise OSError(errno.EIO, "Input/output error", src)
        real_replace(src, dst)

    monkeypatch.setattr(output.os, "replace", replace)
    args = init_args(model_dir, data_file, out, "--overwrite", "--no-visual")
    assert cli.main(args) == 2
    monkeypatch.setattr(output.os, "replace", real_replace)
    one_error_line(capsys, "cannot write --out", "Input/output error")
    assert (out / "adapter_config.json").read_text() == "old"
    assert os.listdir(tmp_path) == ["out"]


KILL_BETWEEN_THE_RENAMES = """
import os, signal, sys
from lora_da.cli import output
output.exchange = lambda a, b: False  # the two-rename swap
real_replace = os.replace
def replace(src, dst):
    if output.TMP_TAG in os.path.basename(src):  # after the old output went aside, before the new one is in
        os.kill(os.getpid(), signal.SIGKILL)
    real_replace(src, dst)
os.replace = replace
staging = output.AtomicDirectory(sys.argv[1], command="lora-da init")
with open(os.path.join(staging.path, "adapter_config.json"), "w") as f:
    f.write("new")
staging.commit()
"""

KILL_WHILE_WRITING = """
import os, signal, sys
from lora_da.cli import output
staging = output.AtomicDirectory(sys.argv[1], command="lora-da init")
with open(os.path.join(staging.path, "adapter_model.safetensors"), "w") as f:
    f.write("half")
os.kill(os.getpid(), signal.SIGKILL)
"""


def run_killed(code, out):
    child = subprocess.run([sys.executable, "-c", textwrap.dedent(code), str(out)], capture_output=True, timeout=300)
    assert child.returncode == -9, child.stderr.decode()[-2000:]


def test_kill_between_the_two_renames_next_run_puts_the_old_output_back(model_dir, data_file, tmp_path, capsys):
    out = tmp_path / "out"
    write_output(out, {"adapter_config.json": "old"})
    run_killed(KILL_BETWEEN_THE_RENAMES, out)
    # What the kill left: no --out, the old output aside, the new one in its temporary directory.
    left = sorted(os.listdir(tmp_path))
    assert "out" not in left and len(left) == 2, left
    assert any(output.OLD_TAG in name for name in left) and any(output.TMP_TAG in name for name in left)
    check_out(str(out), True)  # what the next run does first
    assert (out / "adapter_config.json").read_text() == "old"
    assert os.listdir(tmp_path) == ["out"]
    # and the next run then replaces it as usual
    assert cli.main(init_args(model_dir, data_file, out, "--overwrite", "--no-visual")) == 0
    assert "adapter_model.safetensors" in os.listdir(out) and os.listdir(tmp_path) == ["out"]


def test_kill_while_writing_next_run_removes_only_our_leftovers(model_dir, data_file, tmp_path, capsys):
    out = tmp_path / "out"
    run_killed(KILL_WHILE_WRITING, out)
    (leftover,) = os.listdir(tmp_path)
    assert leftover.startswith(".out" + output.TMP_TAG)
    # Not ours, left alone: no marker; a link; an earlier version's temporary directory; a live run's.
    (tmp_path / ".out.lora-da-tmp-user").mkdir()
    (tmp_path / ".out.lora-da-tmp-user" / "data.bin").write_text("mine")
    (tmp_path / ".out.tmp-abc123").mkdir()
    os.symlink(tmp_path / ".out.tmp-abc123", tmp_path / ".out.lora-da-old-link")
    live = AtomicDirectory(str(out))  # this process, still writing
    before = {name: snapshot(tmp_path / name) for name in os.listdir(tmp_path) if name != leftover}
    assert cli.main(init_args(model_dir, data_file, out, "--no-visual")) == 0
    assert leftover not in os.listdir(tmp_path)
    for name, contents in before.items():
        assert snapshot(tmp_path / name) == contents, name
    live.discard()
