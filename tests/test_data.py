"""Calibration data from JSONL files (lora_da.data): labels per format, rows cut to nothing, hostile lines, streaming."""

import sys

import pytest

from lora_da.data import encode_rows
from cli_helpers import tiny_tokenizer, write_jsonl


def test_prompt_response_labels_cover_the_response_only():
    tok = tiny_tokenizer()
    [sample] = encode_rows([(1, {"prompt": "how many cats", "response": "two cats"})], tok, max_length=64)
    ids = tok("how many cats")["input_ids"]
    assert sample.input_ids.tolist()[: len(ids)] == ids
    assert sample.labels.tolist() == [-100] * len(ids) + tok("two cats", add_special_tokens=False)["input_ids"] + [2]


def test_messages_loss_on_assistant_turns_only():
    tok = tiny_tokenizer()
    row = {
        "messages": [
            {"role": "user", "content": "how many cats"},
            {"role": "assistant", "content": "two"},
            {"role": "user", "content": "and dogs"},
            {"role": "assistant", "content": "three dog"},
        ]
    }
    [sample] = encode_rows([(1, row)], tok, max_length=64)
    with_loss = tok.convert_ids_to_tokens([i for i, l in zip(sample.input_ids.tolist(), sample.labels.tolist()) if l != -100])
    assert with_loss == ["two", "[EOS]", "three", "dog", "[EOS]"]


def test_rows_whose_loss_is_cut_off_are_skipped(tmp_path):
    from lora_da.data import DataError, load_calibration_samples

    tok = tiny_tokenizer()
    long_prompt = {"prompt": " ".join(["cat"] * 40), "response": "two dog"}
    rows = [{"text": "a big cat"}, long_prompt, {"prompt": "how many", "response": "one"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    samples = load_calibration_samples(path, tok, 2, max_length=16)
    assert [s.line for s in samples] == [1, 3]
    with pytest.raises(DataError, match="has 2 usable row"):
        load_calibration_samples(path, tok, 3, max_length=16)
    assert len(load_calibration_samples(path, tok, 3, max_length=64)) == 3


# -- hostile and odd JSONL lines: one-line DataError with path:line (issue #16) -------------


def _write_bytes(path, lines):
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


GOOD = b'{"text": "a big cat"}'
HOSTILE_LINES = {
    "deep nesting": (b"[" * 200_000 + b"]" * 200_000, "JSON nested too deeply to parse"),
    "huge integer": (b'{"text": "a cat", "n": ' + b"7" * 5000 + b"}", "cannot parse this JSON (Exceeds the limit"),
    "invalid UTF-8": (b'{"text": "a \xff cat"}', "not valid UTF-8 (byte 0xff at byte 13 of the line)"),
    "truncated UTF-8": (b'{"text": "a \xc3', "not valid UTF-8 (byte 0xc3 at byte 13 of the line)"),
    "array": (b"[1, 2]", "expected a JSON object, got an array"),
    "number": (b"3", "expected a JSON object, got a number"),
    "string": (b'"a cat"', "expected a JSON object, got a string"),
    "null": (b"null", "expected a JSON object, got null"),
    "null byte in a string": (b'{"text": "a\x00b"}', "not valid JSON (Invalid control character at column 12)"),
    "null byte outside": (b'\x00{"text": "a"}', "not valid JSON (Expecting value at column 1)"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_LINES))
def test_hostile_lines_are_one_line_data_errors(case, tmp_path):
    from lora_da.data import DataError, read_jsonl

    line, message = HOSTILE_LINES[case]
    if case == "huge integer" and not getattr(sys, "get_int_max_str_digits", lambda: 0)():
        pytest.skip("this Python converts integers of any length")
    path = _write_bytes(tmp_path / "d.jsonl", [GOOD, line, GOOD])
    with pytest.raises(DataError) as raised:
        read_jsonl(path)
    text = str(raised.value)
    assert text.startswith(f"{path}:2: ") and message in text and "\n" not in text, text


def test_json_error_message_says_at_once(tmp_path):
    from lora_da.data import DataError, read_jsonl

    path = _write_bytes(tmp_path / "d.jsonl", [b'{"text": "a\tb"}', b'{"text": "a'])
    with pytest.raises(DataError, match=r"d\.jsonl:1: not valid JSON \(Invalid control character at column 12\)$"):
        read_jsonl(path)
    path = _write_bytes(tmp_path / "d.jsonl", [GOOD, b'{"text": "a'])
    with pytest.raises(DataError, match=r"d\.jsonl:2: not valid JSON \(Unterminated string starting at column 10\)$"):
        read_jsonl(path)


def test_bom_crlf_and_blank_lines_are_read(tmp_path):
    from lora_da.data import read_jsonl

    path = tmp_path / "d.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "a cat"}\r\n\r\n  \t\r\n{"text": "a dog"}\r\n{"text": "one"}')
    assert read_jsonl(str(path)) == [(1, {"text": "a cat"}), (4, {"text": "a dog"}), (5, {"text": "one"})]


def test_bom_after_the_first_line_is_named_as_such(tmp_path):
    from lora_da.data import DataError, read_jsonl

    path = _write_bytes(tmp_path / "d.jsonl", [b"\xef\xbb\xbf" + GOOD] * 2)
    with pytest.raises(DataError, match=r"d\.jsonl:2: a UTF-8 byte-order mark, which only the start of the file may have"):
        read_jsonl(path)


def test_utf16_file_is_named_as_such(tmp_path):
    from lora_da.data import DataError, read_jsonl

    path = tmp_path / "d.jsonl"
    path.write_bytes('{"text": "a cat"}\n'.encode("utf-16"))
    with pytest.raises(DataError, match=r"d\.jsonl:1: the file is UTF-16"):
        read_jsonl(str(path))


def test_lone_surrogate_escape_is_a_data_error():
    from lora_da.data import DataError

    tok = tiny_tokenizer()
    for row, what in (
        ({"text": "a \ud800 cat"}, "field 'text'"),
        ({"prompt": "a cat", "response": "two \udfff"}, "field 'response'"),
        ({"messages": [{"role": "user", "content": "a \ud834"}, {"role": "assistant", "content": "two"}]},
         "the rendered conversation"),
    ):
        with pytest.raises(DataError, match=rf"data:3: {what} holds a lone surrogate \(\\ud"):
            encode_rows([(3, row)], tok, max_length=64)


def test_empty_file_says_it_has_no_rows(tmp_path):
    from lora_da.data import DataError, load_calibration_samples

    tok = tiny_tokenizer()
    for content in (b"", b"\n  \n\r\n"):
        path = tmp_path / "d.jsonl"
        path.write_bytes(content)
        with pytest.raises(DataError) as raised:
            load_calibration_samples(str(path), tok, 4, max_length=16)
        assert str(raised.value) == f"{path} has no rows (it is empty or only blank lines)"
    # Rows, none usable: no advice to pass --samples 0.
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": " ".join(["cat"] * 40), "response": "two"}] * 3)
    with pytest.raises(DataError, match="has 3 row.s. but none is usable.*raise --max-length") as raised:
        load_calibration_samples(path, tok, 2, max_length=16)
    assert "--samples 0" not in str(raised.value)


# -- streaming: only the rows needed are read ---------------------------------------------


def test_rows_after_those_needed_are_never_parsed(tmp_path):
    from lora_da.data import load_calibration_samples

    tok = tiny_tokenizer()
    lines = [b'{"text": "a big cat"}'] * 4 + [b"garbage \xff {{{", b"[" * 100_000]
    path = _write_bytes(tmp_path / "d.jsonl", lines)
    assert [s.line for s in load_calibration_samples(path, tok, 4, max_length=16)] == [1, 2, 3, 4]


def test_encode_rows_takes_no_row_past_the_limit():
    tok = tiny_tokenizer()
    taken = []

    def rows():
        for number in range(1, 100):
            taken.append(number)
            yield number, ({"text": "a big cat"} if number != 3 else {"prompt": " ".join(["cat"] * 40), "response": "x"})

    samples = encode_rows(rows(), tok, max_length=16, limit=4)
    assert [s.line for s in samples] == [1, 2, 4, 5] and taken == [1, 2, 3, 4, 5]
    assert encode_rows(rows(), tok, max_length=16, limit=0) == []


def test_reading_a_few_rows_of_a_big_file_takes_little_memory(tmp_path):
    """4 rows of a ~50 MB file: the peak of Python allocations stays far below the file."""
    import tracemalloc

    from lora_da.data import load_calibration_samples

    tok = tiny_tokenizer()
    load_calibration_samples(write_jsonl(tmp_path / "warm.jsonl", [{"text": "a big cat"}] * 4), tok, 4, max_length=16)
    path = tmp_path / "big.jsonl"
    with open(path, "wb") as f:
        f.write(b'{"text": "a big cat"}\n' * 4)
        f.write(b'{"text": "' + b"cat " * (10 << 20) + b'"}\n')  # one 40 MB line
        f.write(b'{"text": "a big dog"}\n' * 500_000)  # and 11 MB of short ones
    assert path.stat().st_size > 50e6
    tracemalloc.start()
    try:
        samples = load_calibration_samples(str(path), tok, 4, max_length=16)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(samples) == 4 and peak < 4e6, peak
