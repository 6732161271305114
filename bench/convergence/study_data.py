"""Data of the published-recipe convergence study (GitHub issue #21).

reasoning-gym ``gsm_symbolic`` problems as chat conversations (SmolLM2's chat template, its
default system prompt included): user = question, assistant = ``metadata.answer_cot`` (the
worked solution ending in ``#### N``). Loss on the assistant turn only, as the template
renders it: the solution, the turn end ``<|im_end|>`` (the EOS of generation) and the
template's newline after it. The prompt (system + user + assistant header) is masked.

No truncation: a sample longer than ``max_len`` tokens is dropped (counted per split).

Splits (each a list of rows ``{question, answer_text, reference}``):

* ``train``: the first ``train_n`` kept problems of seed ``train_seed`` (duplicates of a
  question inside train are kept: they are part of the generated distribution); the
  first ``calib_n`` of them are the init's calibration samples.
* held-out problems of seed ``heldout_seed``: a question that is in the train pool or
  already seen in the held-out stream is skipped (deduplicated by question text); the
  kept ones fill, in order, ``pick`` (the LR-pick loss), ``report`` (the reported loss)
  and ``em`` (the greedy exact-match prompts) - three disjoint parts.
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Sequence, Tuple

from common import IGNORE_INDEX, file_lock, prompt_and_answer_ids, write_json_atomic

GENERATION_CHUNK = 256  # problems generated per round while filling a split


def problems(n: int, seed: int) -> List[dict]:
    """``n`` problems of ``gsm_symbolic`` made with ``seed``: question, worked answer, reference number."""
    import reasoning_gym

    rows = []
    for item in reasoning_gym.create_dataset("gsm_symbolic", size=n, seed=seed):
        answer = item.get("metadata", {}).get("answer_cot") or item["answer"]
        rows.append({"question": item["question"], "answer_text": answer, "reference": str(item["answer"])})
    return rows


def encode_full(tokenizer, row: dict, eos_id: int) -> dict:
    """The whole conversation's token ids, labels only on the assistant turn (no truncation)."""
    prompt_ids, answer_ids = prompt_and_answer_ids(tokenizer, row)
    if eos_id not in answer_ids:
        raise ValueError("the chat template's assistant turn does not contain the EOS token")
    return {
        "input_ids": prompt_ids + answer_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + answer_ids,
        "prompt_tokens": len(prompt_ids),
        "answer_tokens": len(answer_ids),
    }


def _fill(tokenizer, eos_id: int, seed: int, wanted: int, max_len: int, skip_questions: set, dedupe: bool):
    """Kept rows of seed ``seed`` until ``wanted``: (rows, dropped as too long, skipped as duplicates, generated)."""
    kept: List[dict] = []
    too_long = duplicates = generated = 0
    seen = set(skip_questions)
    size = 0
    while len(kept) < wanted:
        size += max(GENERATION_CHUNK, 2 * (wanted - len(kept)))
        rows = problems(size, seed)[generated:]  # reasoning-gym's stream is a prefix of a longer one
        for row in rows:
            generated += 1
            if dedupe and row["question"] in seen:
                duplicates += 1
                continue
            if len(encode_full(tokenizer, row, eos_id)["input_ids"]) > max_len:
                too_long += 1
                continue
            if dedupe:
                seen.add(row["question"])
            kept.append(row)
            if len(kept) == wanted:
                break
    return kept, too_long, duplicates, generated


def build_splits(tokenizer, eos_id: int, *, train_n: int, train_seed: int, heldout_seed: int, pick_n: int,
                 report_n: int, em_n: int, max_len: int) -> dict:
    """The study's splits and a summary of what was dropped (see the module doc)."""
    if train_seed == heldout_seed:
        raise ValueError("the held-out problems need a seed different from the train set's")
    train, train_long, _, train_generated = _fill(tokenizer, eos_id, train_seed, train_n, max_len, set(), False)
    train_questions = {row["question"] for row in train}
    held_n = pick_n + report_n + em_n
    heldout, held_long, held_dupes, held_generated = _fill(
        tokenizer, eos_id, heldout_seed, held_n, max_len, train_questions, True)
    lengths = [len(encode_full(tokenizer, row, eos_id)["input_ids"]) for row in train]
    info = {
        "source": "reasoning-gym gsm_symbolic (assistant = metadata.answer_cot)",
        "max_len": max_len,
        "train_seed": train_seed,
        "train_generated": train_generated,
        "train_dropped_too_long": train_long,
        "train_n": len(train),
        "train_distinct_questions": len(train_questions),
        "train_tokens_median": sorted(lengths)[len(lengths) // 2],
        "train_tokens_max": max(lengths),
        "heldout_seed": heldout_seed,
        "heldout_generated": held_generated,
        "heldout_dropped_too_long": held_long,
        "heldout_skipped_duplicate_or_in_train": held_dupes,
        "pick_n": pick_n,
        "report_n": report_n,
        "em_n": em_n,
    }
    return {
        "info": info,
        "train": train,
        "pick": heldout[:pick_n],
        "report": heldout[pick_n: pick_n + report_n],
        "em": heldout[pick_n + report_n:],
    }


def load_splits(data_dir: str, tokenizer, eos_id: int, **sizes) -> dict:
    """:func:`build_splits`, cached as JSON in ``data_dir`` (keyed by the sizes)."""
    key = "_".join(f"{k}{v}" for k, v in sorted(sizes.items()))
    path = os.path.join(data_dir, f"study_{key}.json")
    with file_lock(path + ".lock"):
        if not os.path.exists(path):
            write_json_atomic(path, build_splits(tokenizer, eos_id, **sizes))
    with open(path) as handle:
        return json.load(handle)


def check_disjoint(splits: dict) -> Dict[str, int]:
    """Overlaps by question text between the parts (all must be 0; raises otherwise)."""
    parts = {name: {row["question"] for row in splits[name]} for name in ("train", "pick", "report", "em")}
    overlaps = {}
    names = list(parts)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            overlaps[f"{a}&{b}"] = len(parts[a] & parts[b])
    if any(overlaps.values()):
        raise ValueError(f"the study's splits overlap: {overlaps}")
    for name in ("pick", "report", "em"):
        if len(parts[name]) != len(splits[name]):
            raise ValueError(f"held-out part {name} has duplicate questions")
    return overlaps


def encode_rows(tokenizer, rows: Sequence[dict], eos_id: int) -> List[dict]:
    return [encode_full(tokenizer, row, eos_id) for row in rows]


def split_sizes(args) -> Dict[str, int]:
    """The ``load_splits`` keyword arguments from a run's parsed options."""
    return {"train_n": args.train_n, "train_seed": args.train_seed, "heldout_seed": args.heldout_seed,
            "pick_n": args.pick_n, "report_n": args.report_n, "em_n": args.em_n, "max_len": args.max_len}


def token_summary(samples: Sequence[dict]) -> Tuple[float, float]:
    """Median prompt and answer tokens."""
    prompts = sorted(s["prompt_tokens"] for s in samples)
    answers = sorted(s["answer_tokens"] for s in samples)
    return float(prompts[len(prompts) // 2]), float(answers[len(answers) // 2])
