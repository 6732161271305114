"""Calibration data from JSONL rows (lora_da.data): labels per format, rows cut to nothing."""

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
