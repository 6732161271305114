"""Shared pieces of the command-line tests: a tiny word-level tokenizer (offline),
JSONL rows of the three formats, and the arguments of a small ``lora-da init``.
The fixtures built from them (``model_dir``, ``mixed_rows``, ``data_file``) are in conftest.py."""

import json
import random

import torch

WORDS = (
    "the a cat dog runs sees eats big small red blue one two three four five six seven eight nine ten "
    "and or not is are was has have how many what where who why plus minus times equals answer question "
    "apples pears boxes each gives takes left right up down more less total sum half double"
).split()
SPECIALS = ["[PAD]", "[BOS]", "[EOS]", "[UNK]", "<|user|>", "<|assistant|>", "<|system|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} [EOS] {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
RANK = 4



def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(SPECIALS + WORDS)}
    assert len(vocab) <= 128  # tiny_llama's vocabulary
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="[BOS]", eos_token="[EOS]", pad_token="[PAD]", unk_token="[UNK]"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def sentence(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return str(path)


def make_mixed_rows():
    """12 rows cycling through the text, prompt/response and messages formats."""
    rng = random.Random(0)
    rows = []
    for i in range(12):
        kind = i % 3
        if kind == 0:
            rows.append({"text": sentence(rng, rng.randint(5, 20))})
        elif kind == 1:
            rows.append({"prompt": sentence(rng, rng.randint(3, 8)), "response": sentence(rng, rng.randint(3, 8))})
        else:
            rows.append(
                {
                    "messages": [
                        {"role": "user", "content": sentence(rng, 5)},
                        {"role": "assistant", "content": sentence(rng, 4)},
                        {"role": "user", "content": sentence(rng, 3)},
                        {"role": "assistant", "content": sentence(rng, 6)},
                    ]
                }
            )
    return rows


def init_args(model_dir, data, out, *extra):
    return [
        "init", "--model", model_dir, "--data", data, "--rank", str(RANK), "--samples", "12",
        "--max-length", "64", "--batch-size", "5", "--out", str(out), "--quiet", "--lora-alpha", "16", *extra,
    ]


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids).logits
