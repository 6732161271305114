"""``lora-da bench`` (``lora_da.cli.bench``)."""

import json
import os

from lora_da import cli
from cli_helpers import RANK


def test_bench_prints_table(model_dir, data_file, tmp_path, capsys):
    out_json = tmp_path / "bench.json"
    args = ["bench", "--model", model_dir, "--data", data_file, "--rank", str(RANK), "--samples", "8",
            "--max-length", "64", "--quiet", "--json", str(out_json)]
    assert cli.main(args) == 0
    text = capsys.readouterr().out
    for row in ("plain forward+backward", "lora-da statistics pass", "lora-da solves", "lora-da total", "init overhead"):
        assert row in text
    numbers = json.loads(out_json.read_text())
    assert numbers["samples"] == 8 and numbers["seconds"]["plain forward+backward"] > 0
    assert cli.main(["bench", "--model", str(tmp_path / "nope"), "--data", data_file]) == 2


def test_bench_json_is_checked_first_and_replaces_only_an_earlier_bench_json(model_dir, data_file, tmp_path, monkeypatch, capsys):
    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before --json was checked")

    args = ["bench", "--model", model_dir, "--data", data_file, "--rank", str(RANK), "--samples", "4",
            "--max-length", "64", "--quiet", "--json"]
    mine = tmp_path / "notes.json"
    mine.write_text('{"mine": 1}')
    with monkeypatch.context() as patch:
        patch.setattr("lora_da.cli.bench.load_model_and_tokenizer", load)
        for path, message in ((mine, "is not an earlier lora-da bench output"), (data_file, "is not an earlier"),
                              (tmp_path, "is a directory"), (tmp_path / "nope" / "b.json", "does not exist")):
            assert cli.main(args + [str(path)]) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and message in err[0], err
    assert mine.read_text() == '{"mine": 1}'
    out_json = tmp_path / "bench.json"
    assert cli.main(args + [str(out_json)]) == 0
    assert json.loads(out_json.read_text())["command"] == "lora-da bench"
    assert cli.main(args + [str(out_json)]) == 0  # an earlier bench output is replaced
    assert sorted(os.listdir(tmp_path)) == ["bench.json", "notes.json"]
