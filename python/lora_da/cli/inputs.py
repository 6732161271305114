"""Calibration data for the commands: JSONL files or in-memory rows, tokenized
and batched."""

from __future__ import annotations

from typing import Any, Iterable, List, Union

from ..data import DataError, EncodedSample, encode_rows, load_calibration_samples, short_data_message
from ..data import count_rows as _count_rows
from ..models import batches
from .errors import UsageError


def encode_data(
    data: Union[str, Iterable[dict]], tokenizer: Any, num_samples: int, max_length: int, truncate: bool
) -> List[EncodedSample]:
    """The first ``num_samples`` usable rows of ``data`` (a JSONL path or in-memory
    rows), tokenized; bad data is a :class:`UsageError` naming the row."""
    try:
        if isinstance(data, str):
            return load_calibration_samples(data, tokenizer, num_samples, max_length=max_length, truncate=truncate)
        rows = list(enumerate(data, start=1))
        samples = encode_rows(rows, tokenizer, max_length=max_length, truncate=truncate, path="<data>", limit=num_samples)
        if len(samples) < num_samples:
            raise DataError(short_data_message("the data", len(rows), len(samples), num_samples, max_length))
        return samples
    except DataError as error:
        raise UsageError(str(error)) from None


def make_loader(samples: List[EncodedSample], tokenizer: Any, batch_size: int) -> List[dict]:
    """Padded batches of ``batch_size`` samples (pad: the tokenizer's pad token, else
    its EOS token, else 0)."""
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return list(batches([s.as_dict() for s in samples], batch_size, pad_token_id=int(pad)))


def count_rows(path: str) -> int:
    """The non-blank lines of a JSONL file (the default ``--train-size``), counted
    in binary without parsing, in constant memory; an unreadable file is a
    :class:`UsageError`."""
    try:
        return _count_rows(path)
    except DataError as error:
        raise UsageError(str(error)) from None
