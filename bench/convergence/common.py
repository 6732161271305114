"""Shared pieces of the convergence benchmark (GitHub issue #8): data, tokenization, file locks.

Data: GSM8K-style problems from reasoning-gym ``gsm_symbolic`` as chat rows
(user = question, assistant = ``metadata.answer_cot`` or ``answer``), as
``lora_da.demo_assets.gsm_rows`` makes them, plus the reference answer for exact match.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import statistics
from typing import Dict, List, Optional, Sequence, Tuple

import torch

IGNORE_INDEX = -100
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@contextlib.contextmanager
def file_lock(path: str):
    """An exclusive ``flock`` on ``path`` (created if missing): parallel runs compute a shared asset once."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_json_atomic(path: str, obj) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as handle:
        json.dump(obj, handle, indent=1)
    os.replace(tmp, path)


def gsm_problems(n: int, seed: int) -> List[dict]:
    """``n`` problems of ``gsm_symbolic`` made with ``seed``: question, answer text, reference number."""
    import reasoning_gym

    rows = []
    for item in reasoning_gym.create_dataset("gsm_symbolic", size=n, seed=seed):
        answer = item.get("metadata", {}).get("answer_cot") or item["answer"]
        rows.append({"question": item["question"], "answer_text": answer, "reference": str(item["answer"])})
    return rows


def load_data(data_dir: str, train_n: int, train_seed: int, heldout_n: int, heldout_seed: int) -> Tuple[List[dict], List[dict], dict]:
    """Train set, held-out set (questions also in train dropped) and a summary; cached as JSON in ``data_dir``."""
    path = os.path.join(data_dir, f"gsm_train{train_n}_s{train_seed}_heldout{heldout_n}_s{heldout_seed}.json")
    with file_lock(path + ".lock"):
        if not os.path.exists(path):
            if train_seed == heldout_seed:
                raise ValueError("the held-out set needs a seed different from the train set's")
            train = gsm_problems(train_n, train_seed)
            heldout_all = gsm_problems(heldout_n, heldout_seed)
            train_questions = {row["question"] for row in train}
            heldout = [row for row in heldout_all if row["question"] not in train_questions]
            info = {
                "source": "reasoning-gym gsm_symbolic",
                "train_n": len(train),
                "train_seed": train_seed,
                "heldout_requested": heldout_n,
                "heldout_seed": heldout_seed,
                "heldout_dropped_as_in_train": len(heldout_all) - len(heldout),
                "heldout_n": len(heldout),
                "train_distinct_questions": len(train_questions),
            }
            write_json_atomic(path, {"info": info, "train": train, "heldout": heldout})
    with open(path) as handle:
        blob = json.load(handle)
    return blob["train"], blob["heldout"], blob["info"]


def prompt_and_answer_ids(tokenizer, row: dict) -> Tuple[List[int], List[int]]:
    """Chat-template token ids of the prompt (up to the assistant header) and of the assistant turn."""
    user = [{"role": "user", "content": row["question"]}]
    prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": row["answer_text"]}], tokenize=False)
    if not full.startswith(prompt):
        raise ValueError("the chat template does not render the prompt as a prefix of the conversation")
    prompt_ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    answer_ids = list(tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"])
    return prompt_ids, answer_ids


def encode(tokenizer, row: dict, max_len: int, min_prompt: int) -> dict:
    """One training/eval sample of at most ``max_len`` tokens, loss on the answer tokens only.

    Too long: the prompt is cut from the left down to ``max(min_prompt, max_len - answer)``
    tokens (so the question's tail and the assistant header stay), then the answer's end is cut.
    """
    prompt_ids, answer_ids = prompt_and_answer_ids(tokenizer, row)
    full_prompt, full_answer = len(prompt_ids), len(answer_ids)
    if full_prompt + full_answer > max_len:
        keep_prompt = min(full_prompt, max(min_prompt, max_len - full_answer))
        keep_answer = min(full_answer, max_len - keep_prompt)
        prompt_ids, answer_ids = prompt_ids[full_prompt - keep_prompt:], answer_ids[:keep_answer]
    return {
        "input_ids": prompt_ids + answer_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + answer_ids,
        "kept_prompt": len(prompt_ids),
        "kept_answer": len(answer_ids),
        "full_prompt": full_prompt,
        "full_answer": full_answer,
    }


def truncation_summary(samples: Sequence[dict]) -> dict:
    med = lambda key: float(statistics.median(s[key] for s in samples))  # noqa: E731
    return {
        "median_kept_prompt_tokens": med("kept_prompt"),
        "median_kept_answer_tokens": med("kept_answer"),
        "median_full_prompt_tokens": med("full_prompt"),
        "median_full_answer_tokens": med("full_answer"),
        "fraction_truncated": sum(s["kept_prompt"] + s["kept_answer"] < s["full_prompt"] + s["full_answer"] for s in samples)
        / len(samples),
        "fraction_answer_cut": sum(s["kept_answer"] < s["full_answer"] for s in samples) / len(samples),
    }


def collate(samples: Sequence[dict], pad_id: int) -> Dict[str, torch.Tensor]:
    """Right-padded batch: ``input_ids``, ``attention_mask``, ``labels`` (-100 on padding)."""
    width = max(len(s["input_ids"]) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s["input_ids"])
        ids[i, :n] = torch.tensor(s["input_ids"])
        labels[i, :n] = torch.tensor(s["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def run_name(method: str, lr: float, seed: int) -> str:
    return f"{method}_lr{lr:g}_s{seed}"


def final_number(text: str) -> Optional[float]:
    """The answer number of a generation: after the last ``####``, else the last number in the text."""
    import re

    number = r"-?\$?\s?\d[\d,]*(?:\.\d+)?"
    tail = re.findall(r"####\s*(" + number + ")", text)
    candidates = tail or re.findall(number, text)
    if not candidates:
        return None
    cleaned = re.sub(r"[\s,$]", "", candidates[-1])
    try:
        return float(cleaned)
    except ValueError:
        return None


@torch.no_grad()
def greedy_answers(model, tokenizer, rows: Sequence[dict], gen_batch: int, max_new_tokens: int,
                   eos_id: int, pad_id: int) -> List[dict]:
    """Greedy generation for each row's whole prompt (batches of ``gen_batch``, left padding), cut at
    ``eos_id``: per row ``predicted`` (:func:`final_number`), ``reference``, ``correct``,
    ``stopped_at_eos``, ``new_tokens`` and the decoded ``text``. Leaves the model in eval mode
    with ``use_cache`` off."""
    model.eval()
    model.config.use_cache = True
    results = []
    for i in range(0, len(rows), gen_batch):
        chunk = rows[i: i + gen_batch]
        prompts = [prompt_and_answer_ids(tokenizer, row)[0] for row in chunk]
        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for j, p in enumerate(prompts):
            ids[j, width - len(p):] = torch.tensor(p)
            mask[j, width - len(p):] = 1
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=eos_id, pad_token_id=pad_id)
        for row, seq in zip(chunk, out[:, width:]):
            tokens = seq.tolist()
            stopped = eos_id in tokens
            tokens = tokens[: tokens.index(eos_id)] if stopped else tokens
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            predicted = final_number(text)
            reference = float(row["reference"].replace(",", ""))
            results.append({"predicted": predicted, "reference": reference, "stopped_at_eos": stopped,
                            "new_tokens": len(tokens), "correct": predicted is not None and abs(predicted - reference) < 1e-6,
                            "text": text})
    model.config.use_cache = False
    return results

