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

Errors are :class:`DataError` (a ``ValueError``) with the file and line number.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

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


def read_jsonl(path: str, limit: Optional[int] = None) -> List[Tuple[int, dict]]:
    """``(line number, object)`` for the non-blank lines of a JSONL file (at most ``limit``)."""
    rows: List[Tuple[int, dict]] = []
    try:
        handle = open(path, encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"data file {path} does not exist") from None
    except OSError as error:
        raise DataError(f"cannot read data file {path}: {error.strerror}") from None
    with handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{number}: not valid JSON ({error.msg} at column {error.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            rows.append((number, row))
            if limit is not None and len(rows) >= limit:
                break
    return rows


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
    return value


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
    rows: Sequence[Tuple[int, dict]],
    tokenizer: Any,
    *,
    max_length: int,
    truncate: bool = True,
    path: str = "data",
    limit: Optional[int] = None,
) -> List[EncodedSample]:
    """Tokenize ``(line, row)`` pairs, at most ``limit`` samples. Sequences longer
    than ``max_length`` are cut (or, with ``truncate=False``, rejected); rows
    left with no loss token by the cut are skipped (logged)."""
    warned: Dict[str, bool] = {}
    samples: List[EncodedSample] = []
    skipped: List[int] = []
    for number, row in rows:
        if limit is not None and len(samples) >= limit:
            break
        sample = encode_row(number, row, tokenizer, max_length=max_length, truncate=truncate, path=path, warned=warned)
        if sample is None:
            skipped.append(number)
        else:
            samples.append(sample)
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
    than asked is an error."""
    rows = read_jsonl(path)
    samples = encode_rows(rows, tokenizer, max_length=max_length, truncate=truncate, path=path, limit=num_samples)
    if len(samples) < num_samples:
        usable = "usable " if len(samples) < len(rows) else ""
        raise DataError(
            f"{path} has {len(samples)} {usable}row(s) but --samples {num_samples} were asked; "
            f"pass --samples {len(samples)} or add data"
        )
    return samples
