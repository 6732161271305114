"""``lora-da bench`` (``lora_da.cli.bench``)."""

import json

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
