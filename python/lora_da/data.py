"""Calibration data from JSONL files, tokenized for a causal LM.

Each line of the file is one JSON object in one of three formats:

* ``{"text": "..."}`` — plain text; every token carries loss.
* ``{"prompt": "...", "response": "..."}`` — the loss is on the response only
  (prompt labels are -100); the tokenizer's EOS token is appended to the
  response when it has one.
* ``{"messages": [{"role": "user", "content": "..."}, ...]}`` — rendered with
  the tokenizer's chat template. The loss is on the assistant turns only when
  the template renders each conversation prefix as a prefix of the whole (true
  of the usual ChatML/Llama templates); otherwise on every token, with a
  warning.

The file is UTF-8 (a leading byte-order mark is skipped), one object per
``\\n``-ended line (``\\r\\n`` too); blank lines are skipped. It is read lazily
(:func:`iter_jsonl`): :func:`load_calibration_samples` stops at the last row it
needs, and :func:`count_rows` counts lines in binary without parsing them.

Errors are :class:`DataError` (a ``ValueError``) on one line, with the file and
line number: bytes that are not UTF-8, JSON that does not parse (including
nesting too deep for the parser and integers beyond Python's digit limit), a
line that is not an object, a missing or mistyped field, and strings holding
lone surrogates (``\\ud800`` escapes), which tokenizers cannot take.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
FORMATS = ("text", "prompt/response", "messages")


class DataError(ValueError):
    """A calibration file that cannot be used as given."""


@dataclass
class EncodedSample:
    input_ids: torch.Tensor  # 1-D long
    labels: torch.Tensor  # 1-D long, -100 where no loss
    line: int  # 1-based line number in the source file
    truncated: bool = False

    def as_dict(self) -> dict:
        return {"input_ids": self.input_ids, "labels": self.labels}


_BOM = b"\xef\xbb\xbf"
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
_JSON_TYPES = {"list": "an array", "str": "a string", "int": "a number", "float": "a number",
               "bool": "true/false", "NoneType": "null"}
_BLANK_AFTER_BOM = re.compile(rb"\xef\xbb\xbf[ \t\n\r\x0b\x0c]*")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _open(path: str):
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise DataError(f"data file {path} does not exist") from None
    except OSError as error:
        raise DataError(f"cannot read data file {path}: {error.strerror}") from None


def _json_error(error: json.JSONDecodeError) -> str:
    # Some of json's messages end in "at" and expect the position to follow.
    message = error.msg[:-3] if error.msg.endswith(" at") else error.msg
    return f"not valid JSON ({message} at column {error.colno})"


def _decode_line(raw: bytes, where: str, first: bool) -> str:
    """The text of one line, without its BOM (first line) and line end; decoded
    from a view of ``raw``, so a long line is not copied as bytes."""
    if first and raw.startswith(_UTF16_BOMS):
        raise DataError(f"{where}: the file is UTF-16 (it starts with a UTF-16 byte-order mark); save it as UTF-8")
    start = 0
    if raw.startswith(_BOM):
        if not first:
            raise DataError(
                f"{where}: a UTF-8 byte-order mark, which only the start of the file may have (files joined together?)"
            )
        start = len(_BOM)
    end = len(raw)
    if end > start and raw[end - 1] == 0x0A:
        end -= 1
        if end > start and raw[end - 1] == 0x0D:
            end -= 1
    try:
        return str(memoryview(raw)[start:end], "utf-8")
    except UnicodeDecodeError as error:
        raise DataError(
            f"{where}: not valid UTF-8 (byte 0x{raw[start + error.start]:02x} at byte {error.start + 1} of the line)"
        ) from None


def _parse_line(text: str, where: str) -> Any:
    """One line's JSON value; every way ``json`` can fail on it is a :class:`DataError` naming ``where``."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{where}: {_json_error(error)}") from None
    except RecursionError:
        raise DataError(f"{where}: JSON nested too deeply to parse") from None
    except ValueError as error:  # e.g. an integer longer than Python's int-conversion limit
        reason = str(error).split(";")[0].split("\n")[0]
        raise DataError(f"{where}: cannot parse this JSON ({reason})") from None


def iter_jsonl(path: str) -> Iterator[Tuple[int, dict]]:
    """``(line number, object)`` for the non-blank lines of a JSONL file, read and
    parsed one line at a time, only as far as the caller iterates.

    Lines end in ``\\n`` (``\\r\\n`` too); a UTF-8 byte-order mark at the start
    is skipped. A line that is not UTF-8, not JSON, or not a JSON object is a
    :class:`DataError` with ``path:line``. Blank lines (ASCII whitespace only)
    are skipped but counted in the line numbers."""
    with _open(path) as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw or raw.isspace() or (number == 1 and _BLANK_AFTER_BOM.fullmatch(raw)):
                continue  # blank (neither test copies the line, unlike strip())
            where = f"{path}:{number}"
            text = _decode_line(raw, where, number == 1)
            del raw  # one copy of a (possibly long) line at a time
            row = _parse_line(text, where)
            del text
            if not isinstance(row, dict):
                kind = _JSON_TYPES.get(type(row).__name__, type(row).__name__)
                raise DataError(f"{where}: expected a JSON object, got {kind}")
            yield number, row


def read_jsonl(path: str, limit: Optional[int] = None) -> List[Tuple[int, dict]]:
    """``(line number, object)`` for the non-blank lines of a JSONL file (at most
    ``limit``; lines after those are not read). See :func:`iter_jsonl`."""
    rows: List[Tuple[int, dict]] = []
    if limit is not None and limit <= 0:
        return rows
    iterator = iter_jsonl(path)
    try:
        for item in iterator:
            rows.append(item)
            if limit is not None and len(rows) >= limit:
                break
    finally:
        iterator.close()
    return rows


def count_rows(path: str, chunk_size: int = 1 << 20) -> int:
    """The non-blank lines of a JSONL file, counted the way :func:`iter_jsonl`
    numbers them but without decoding or parsing anything: read in binary, in
    chunks of ``chunk_size`` bytes (constant memory, whatever the line lengths)."""
    count = 0
    pending = False  # the current (unfinished) line has a non-blank byte
    first = True
    with _open(path) as handle:
        while True:
            chunk = handle.read(max(chunk_size, len(_BOM)) if first else chunk_size)
            if not chunk:
                break
            if first:
                if chunk.startswith(_BOM):
                    chunk = chunk[len(_BOM):]
                first = False
            pieces = chunk.split(b"\n")
            for piece in pieces[:-1]:
                if pending or (piece and not piece.isspace()):
                    count += 1
                pending = False
            if pieces[-1] and not pieces[-1].isspace():
                pending = True
    return count + int(pending)


def row_format(row: dict, where: str) -> str:
    """Which of :data:`FORMATS` a row uses."""
    if "messages" in row:
        return "messages"
    if "prompt" in row or "response" in row:
        for key in ("prompt", "response"):
            if key not in row:
                raise DataError(f"{where}: has '{'prompt' if key == 'response' else 'response'}' but no '{key}' field")
        return "prompt/response"
    if "text" in row:
        return "text"
    keys = ", ".join(sorted(row)) or "none"
    raise DataError(f"{where}: needs a 'text', 'prompt'+'response' or 'messages' field (has: {keys})")


def _string_field(row: dict, key: str, where: str) -> str:
    value = row[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
    _check_text(value, f"field '{key}'", where)
    return value


def _check_text(text: str, what: str, where: str) -> None:
    # JSON escapes such as \ud800 can make strings that are not Unicode text; tokenizers reject them with a TypeError.
    found = _SURROGATE.search(text)
    if found:
        raise DataError(
            f"{where}: {what} holds a lone surrogate (\\u{ord(found.group()):04x} at character {found.start() + 1}), "
            "which is not text"
        )


def _ids(tokenizer, text: str, add_special_tokens: bool) -> List[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def _encode_text(tokenizer, row: dict, where: str) -> Tuple[List[int], List[int]]:
    ids = _ids(tokenizer, _string_field(row, "text", where), True)
    return ids, list(ids)


def _encode_prompt_response(tokenizer, row: dict, where: str) -> Tuple[List[int], List[int]]:
    prompt = _ids(tokenizer, _string_field(row, "prompt", where), True)
    response = _ids(tokenizer, _string_field(row, "response", where), False)
    if tokenizer.eos_token_id is not None:
        response.append(int(tokenizer.eos_token_id))
    return prompt + response, [IGNORE_INDEX] * len(prompt) + response


def _render(tokenizer, messages: Sequence[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)


def _encode_messages(tokenizer, row: dict, where: str, warned: Dict[str, bool]) -> Tuple[List[int], List[int]]:
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field 'messages' must be a non-empty list")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or "content" not in message:
            raise DataError(f"{where}: messages[{index}] needs 'role' and 'content'")
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError(f"{where}: 'messages' rows need a tokenizer with a chat template, and this one has none")
    try:
        full = _render(tokenizer, messages, False)
    except Exception as error:  # jinja errors, raise_exception() in templates
        raise DataError(f"{where}: the chat template failed on this conversation: {error}") from None
    _check_text(full, "the rendered conversation", where)
    # Character spans of the assistant turns, from renderings of the conversation's prefixes.
    spans: List[Tuple[int, int]] = []
    prefix_ok = True
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        try:
            before = _render(tokenizer, messages[:index], True) if index else ""
            upto = _render(tokenizer, messages[: index + 1], False)
        except Exception:
            prefix_ok = False
            break
        if not (full.startswith(upto) and upto.startswith(before)):
            prefix_ok = False
            break
        spans.append((len(before), len(upto)))
    encoding = tokenizer(full, add_special_tokens=False, return_offsets_mapping=prefix_ok)
    ids = list(encoding["input_ids"])
    if not spans and prefix_ok:
        raise DataError(f"{where}: the conversation has no assistant turn to put the loss on")
    if not prefix_ok:
        if not warned.get("messages"):
            logger.warning(
                "the chat template does not render conversation prefixes as prefixes of the whole: "
                "the loss of 'messages' rows is on every token (first seen at %s)",
                where,
            )
            warned["messages"] = True
        return ids, list(ids)
    labels = [IGNORE_INDEX] * len(ids)
    for position, (start, _end) in enumerate(encoding["offset_mapping"]):
        if any(lo <= start < hi for lo, hi in spans):
            labels[position] = ids[position]
    return ids, labels


def encode_row(number: int, row: dict, tokenizer: Any, *, max_length: int, truncate: bool, path: str,
               warned: Optional[Dict[str, bool]] = None) -> Optional[EncodedSample]:
    """One row as a sample; ``None`` when cutting it to ``max_length`` leaves no
    token with a loss (e.g. a prompt longer than ``max_length``)."""
    where = f"{path}:{number}"
    kind = row_format(row, where)
    if kind == "text":
        ids, labels = _encode_text(tokenizer, row, where)
    elif kind == "prompt/response":
        ids, labels = _encode_prompt_response(tokenizer, row, where)
    else:
        ids, labels = _encode_messages(tokenizer, row, where, {} if warned is None else warned)
    if len(ids) < 2:
        raise DataError(f"{where}: {len(ids)} token(s); a causal LM needs at least 2 to have a loss")
    if all(label == IGNORE_INDEX for label in labels[1:]):
        raise DataError(f"{where}: no token carries loss (empty response or assistant turn?)")
    truncated = False
    if len(ids) > max_length:
        if not truncate:
            raise DataError(
                f"{where}: {len(ids)} tokens, longer than --max-length {max_length} (drop --no-truncate to cut it)"
            )
        ids, labels, truncated = ids[:max_length], labels[:max_length], True
        if all(label == IGNORE_INDEX for label in labels[1:]):
            return None
    return EncodedSample(
        input_ids=torch.tensor(ids, dtype=torch.long),
        labels=torch.tensor(labels, dtype=torch.long),
        line=number,
        truncated=truncated,
    )


def encode_rows(
    rows: Iterable[Tuple[int, dict]],
    tokenizer: Any,
    *,
    max_length: int,
    truncate: bool = True,
    path: str = "data",
    limit: Optional[int] = None,
) -> List[EncodedSample]:
    """Tokenize ``(line, row)`` pairs, at most ``limit`` samples. Sequences longer
    than ``max_length`` are cut (or, with ``truncate=False``, rejected); rows
    left with no loss token by the cut are skipped (logged). ``rows`` may be a
    lazy iterator (:func:`iter_jsonl`): no row is taken from it once ``limit``
    samples are made."""
    warned: Dict[str, bool] = {}
    samples: List[EncodedSample] = []
    skipped: List[int] = []
    if limit is not None and limit <= 0:
        return samples
    for number, row in rows:
        sample = encode_row(number, row, tokenizer, max_length=max_length, truncate=truncate, path=path, warned=warned)
        if sample is None:
            skipped.append(number)
        else:
            samples.append(sample)
            if limit is not None and len(samples) >= limit:
                break
    if skipped:
        logger.warning(
            "%d row(s) skipped: no token with a loss within --max-length %d (first: %s:%d)",
            len(skipped), max_length, path, skipped[0],
        )
    return samples


def load_calibration_samples(
    path: str, tokenizer: Any, num_samples: int, *, max_length: int, truncate: bool = True
) -> List[EncodedSample]:
    """The first ``num_samples`` usable rows of a JSONL file, tokenized; fewer
    than asked is an error. The file is read and parsed only up to the last row
    needed (and the file buffer's read-ahead); the lines after it are not parsed."""
    rows = iter_jsonl(path)
    seen = 0

    def counted() -> Iterator[Tuple[int, dict]]:
        nonlocal seen
        for item in rows:
            seen += 1
            yield item

    try:
        samples = encode_rows(counted(), tokenizer, max_length=max_length, truncate=truncate, path=path, limit=num_samples)
    finally:
        rows.close()
    if len(samples) < num_samples:
        raise DataError(short_data_message(path, seen, len(samples), num_samples, max_length))
    return samples


def short_data_message(name: str, rows: int, usable: int, num_samples: int, max_length: int) -> str:
    """The error for data with fewer usable rows than ``--samples`` asks for
    (``rows`` rows, ``usable`` of them usable once cut to ``max_length``)."""
    if rows == 0:
        return f"{name} has no rows (it is empty or only blank lines)"
    if usable == 0:
        return (
            f"{name} has {rows} row(s) but none is usable: cut to --max-length {max_length}, "
            "none keeps a token with a loss; raise --max-length"
        )
    qualifier = "usable " if usable < rows else ""
    return f"{name} has {usable} {qualifier}row(s) but --samples {num_samples} were asked; pass --samples {usable} or add data"
