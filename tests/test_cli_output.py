"""The ``--out`` directory (``lora_da.cli.output``): overwrite rules and atomic writes."""

import os

import pytest

from lora_da import cli
from lora_da.cli.errors import UsageError
from lora_da.cli.output import REPLACE_OWN_OUTPUT, AtomicDirectory, check_out
from cli_helpers import init_args


def test_overwrite_rules(model_dir, data_file, tmp_path):
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert cli.main(init_args(model_dir, data_file, out)) == 2
    assert os.listdir(out) == ["keep.txt"]
    assert cli.main(init_args(model_dir, data_file, out, "--overwrite", "--no-visual")) == 0
    assert "keep.txt" not in os.listdir(out) and "adapter_config.json" in os.listdir(out)
    # the demo replaces only an earlier lora-da output
    check_out(str(out), REPLACE_OWN_OUTPUT)
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(UsageError, match="not an earlier lora-da output"):
        check_out(str(other), REPLACE_OWN_OUTPUT)


def test_atomic_directory_commit_replaces_and_discard_leaves_nothing(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    staging = AtomicDirectory(str(target))
    (tmp_path / os.path.basename(staging.path) / "new.txt").write_text("new")
    assert os.listdir(target) == ["old.txt"]  # untouched until commit
    staging.commit()
    assert os.listdir(target) == ["new.txt"] and os.listdir(tmp_path) == ["out"]
    staging = AtomicDirectory(str(target))
    staging.discard()
    assert os.listdir(target) == ["new.txt"] and os.listdir(tmp_path) == ["out"]
    with pytest.raises(UsageError, match="is a file"):
        check_out(str(target / "new.txt"), False)
