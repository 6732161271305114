"""A Hugging Face causal LM and its tokenizer from a model directory, and the
sequence length the CLI may use with it."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Optional, Tuple

import torch

from .errors import UsageError

if TYPE_CHECKING:  # annotations only: transformers is imported when a model is loaded
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_MAX_LENGTH = 1024


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a ``--dtype`` choice (one of :data:`DTYPES`)."""
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def resolve_device(name: Optional[str]) -> str:
    """The ``--device`` to use: ``name`` if given (a CUDA one only when CUDA is
    available), else ``cuda`` when available, else ``cpu``."""
    if name:
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise UsageError(f"--device {name}: no CUDA device is available")
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none)."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def check_model_dir(model_dir: str) -> None:
    """Refuse a ``--model`` that is not a directory holding ``config.json`` (cheap;
    before any other check or work)."""
    if not os.path.exists(model_dir):
        raise UsageError(f"model directory {model_dir} does not exist")
    if not os.path.isdir(model_dir):
        raise UsageError(f"--model must be a Hugging Face model directory, {model_dir} is a file")
    if not os.path.exists(os.path.join(model_dir, "config.json")):
        raise UsageError(f"{model_dir} is not a Hugging Face model directory (no config.json)")


def load_model_and_tokenizer(
    model_dir: str, dtype: str = "float32", device: Optional[str] = None
) -> Tuple["PreTrainedModel", "PreTrainedTokenizerBase"]:
    """A causal LM (in eval mode, on ``device``) and its tokenizer from a Hugging
    Face model directory, offline; every failure is a :class:`UsageError` with a
    one-line reason."""
    check_model_dir(model_dir)
    # Deferred: transformers is an optional extra (lora-da[hf]) and slow to import.
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except Exception as error:
        raise UsageError(f"cannot read the model config in {model_dir}: {first_line(error)}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except Exception as error:
        raise UsageError(f"cannot load a tokenizer from {model_dir}: {first_line(error)}") from None
    if tokenizer is None or isinstance(tokenizer, bool):
        raise UsageError(f"{model_dir} holds no tokenizer")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, config=config, dtype=torch_dtype(dtype), local_files_only=True
        )
    except Exception as error:
        raise UsageError(f"cannot load a causal LM from {model_dir}: {first_line(error)}") from None
    model.to(resolve_device(device))
    model.eval()
    return model, tokenizer


def max_positions(model: "PreTrainedModel") -> Optional[int]:
    """The model's maximum sequence length from its config (``None`` when it names none)."""
    config = model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def resolve_max_length(model: "PreTrainedModel", requested: Optional[int]) -> int:
    """``--max-length``: ``requested`` checked against the model's positions, or
    (``None``) :data:`DEFAULT_MAX_LENGTH` capped by them."""
    limit = max_positions(model)
    if requested is None:
        return min(DEFAULT_MAX_LENGTH, limit) if limit else DEFAULT_MAX_LENGTH
    if requested < 2:
        raise UsageError(f"--max-length must be at least 2, got {requested}")
    if limit is not None and requested > limit:
        raise UsageError(
            f"--max-length {requested} is longer than the model's {limit} positions "
            f"(max_position_embeddings); pass --max-length {limit} or less"
        )
    return requested
