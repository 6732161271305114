"""The commands' data (lora_da.cli.inputs): count_rows for the default --train-size,
the short-data messages, and hostile JSONL lines through ``lora-da init`` (exit 2, one line)."""

import pytest

from lora_da import cli
from lora_da.cli.errors import UsageError
from lora_da.cli.inputs import count_rows, encode_data
from lora_da.data import count_rows as data_count_rows, iter_jsonl
from cli_helpers import init_args, tiny_tokenizer

ODD_FILES = {
    "plain": b'{"text": "a"}\n{"text": "b"}\n',
    "no final newline": b'{"text": "a"}\n{"text": "b"}',
    "blank lines": b'\n\n{"text": "a"}\n   \n\t\r\n{"text": "b"}\n\n',
    "crlf": b'{"text": "a"}\r\n\r\n{"text": "b"}\r\n',
    "bom": b'\xef\xbb\xbf{"text": "a"}\n{"text": "b"}\n',
    "bom on a blank line": b'\xef\xbb\xbf \r\n{"text": "a"}\n{"text": "b"}\n',
    "empty": b"",
    "only blanks": b"\n \n\r\n",
    "long line": b'{"text": "' + b"a " * 5000 + b'"}\n\n{"text": "b"}\n',
}


@pytest.mark.parametrize("case", sorted(ODD_FILES))
def test_count_rows_counts_what_iter_jsonl_reads(case, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(ODD_FILES[case])
    expected = len(list(iter_jsonl(str(path))))
    assert count_rows(str(path)) == expected
    for chunk_size in (1, 2, 3, 7, 64):  # lines and line ends split across chunks
        assert data_count_rows(str(path), chunk_size=chunk_size) == expected, chunk_size


def test_count_rows_reads_bytes_and_does_not_parse(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "a"}\n\xff\xfe not UTF-8\n[[[[\n' + b"7" * 10_000 + b"\n")
    assert count_rows(str(path)) == 4


def test_count_rows_memory_is_constant_whatever_the_line_length(tmp_path):
    import tracemalloc

    path = tmp_path / "d.jsonl"
    with open(path, "wb") as f:
        f.write(b'{"text": "' + b"cat " * (12 << 20) + b'"}\n{"text": "a"}\n')  # one 48 MB line
    tracemalloc.start()
    try:
        count = count_rows(str(path))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 2 and peak < 4e6, peak


def test_count_rows_of_a_missing_file_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        count_rows(str(tmp_path / "nope.jsonl"))


def test_in_memory_data_short_messages():
    tok = tiny_tokenizer()
    with pytest.raises(UsageError, match=r"^the data has no rows"):
        encode_data([], tok, 4, 16, True)
    with pytest.raises(UsageError, match=r"^the data has 1 row\(s\) but --samples 4 were asked; pass --samples 1"):
        encode_data([{"text": "a big cat"}], tok, 4, 16, True)


def _raw(tmp_path, lines):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


GOOD = b'{"text": "a big cat sees the dog"}'
CLI_CASES = {
    "deep nesting": ([GOOD, b"[" * 100_000], "bad.jsonl:2: JSON nested too deeply to parse"),
    "huge integer": ([GOOD, b'{"text": "a", "n": ' + b"1" * 5000 + b"}"], "bad.jsonl:2: cannot parse this JSON"),
    "invalid UTF-8": ([GOOD, b'{"text": "\xc3\x28"}'], "bad.jsonl:2: not valid UTF-8"),
    "control character": ([GOOD, b'{"text": "a\x01b"}'], "bad.jsonl:2: not valid JSON (Invalid control character at column 12)"),
    "not an object": ([GOOD, b"[1, 2]"], "bad.jsonl:2: expected a JSON object, got an array"),
    "lone surrogate": ([GOOD, b'{"text": "a \\ud800"}'], "bad.jsonl:2: field 'text' holds a lone surrogate"),
    "empty file": ([b""], "bad.jsonl has no rows"),
}


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_hostile_jsonl_is_exit_2_and_one_line(case, model_dir, tmp_path, capsys):
    import sys

    lines, message = CLI_CASES[case]
    if case == "huge integer" and not getattr(sys, "get_int_max_str_digits", lambda: 0)():
        pytest.skip("this Python converts integers of any length")
    out = tmp_path / "out"
    assert cli.main(init_args(model_dir, _raw(tmp_path, lines), out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lora-da: error:") and message in err[0], err
    assert "at at" not in err[0] and not out.exists()


def test_init_reads_only_the_rows_it_needs(model_dir, data_file, tmp_path):
    """--samples 12 of a file whose 13th row is garbage: the init succeeds, and
    train_size counts every non-blank line."""
    import json

    with open(data_file, "rb") as f:
        good = f.read()
    path = tmp_path / "d.jsonl"
    path.write_bytes(good + b"garbage \xff [[[\n" + b"[" * 100_000 + b"\n")
    out = tmp_path / "out"
    assert cli.main(init_args(model_dir, str(path), out)) == 0
    report = json.loads((out / "lora_da_report.json").read_text())
    assert report["num_samples"] == 12 and report["train_size"] == 14
