"""Small built-in models and data for the demo and the tests (nothing is downloaded)."""

from __future__ import annotations

from typing import Iterator, List

import torch


def tiny_llama(
    *,
    vocab_size: int = 128,
    hidden_size: int = 32,
    intermediate_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
):
    """A randomly initialized ``transformers.LlamaForCausalLM`` built from a config."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = LlamaForCausalLM(config).to(dtype)
    finally:
        torch.random.set_rng_state(generator_state)
    model.eval()
    return model


def synthetic_samples(
    num_samples: int, *, vocab_size: int = 128, min_len: int = 6, max_len: int = 16, prompt_len: int = 3, seed: int = 0
) -> List[dict]:
    """Random token sequences of varied length; the first ``prompt_len`` tokens
    carry no loss (label -100), like a prompt."""
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(num_samples):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=generator))
        ids = torch.randint(3, vocab_size, (length,), generator=generator)
        labels = ids.clone()
        labels[:prompt_len] = -100
        samples.append({"input_ids": ids, "labels": labels})
    return samples


def collate(samples: List[dict], pad_token_id: int = 0, padding_side: str = "right") -> dict:
    """Pad a list of samples into one batch with ``attention_mask`` and -100 labels on padding."""
    longest = max(s["input_ids"].numel() for s in samples)
    batch = {
        "input_ids": torch.full((len(samples), longest), pad_token_id, dtype=torch.long),
        "attention_mask": torch.zeros((len(samples), longest), dtype=torch.long),
        "labels": torch.full((len(samples), longest), -100, dtype=torch.long),
    }
    for row, sample in enumerate(samples):
        n = sample["input_ids"].numel()
        span = slice(0, n) if padding_side == "right" else slice(longest - n, longest)
        batch["input_ids"][row, span] = sample["input_ids"]
        batch["attention_mask"][row, span] = 1
        batch["labels"][row, span] = sample["labels"]
    return batch


def batches(samples: List[dict], batch_size: int, **collate_kwargs) -> Iterator[dict]:
    """Consecutive padded batches of ``batch_size`` samples."""
    for start in range(0, len(samples), batch_size):
        yield collate(samples[start : start + batch_size], **collate_kwargs)
