"""``lora-da bench``: the init's cost against one plain forward+backward pass."""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Sequence, Union

import torch
from torch import nn

from ..api import initialize
from ..atomic_files import write_atomically
from ..losses import move_to_device
from .errors import UsageError
from .hf_model import load_model_and_tokenizer, resolve_max_length
from .init import target_modules_arg
from .inputs import count_rows, encode_data, make_loader
from .output import check_parent

BENCH_COMMAND = "lora-da bench"


def _sync(device: Union[torch.device, str]) -> None:
    if getattr(device, "type", str(device)).startswith("cuda"):
        torch.cuda.synchronize(device)


def plain_pass_seconds(model: nn.Module, loader: Sequence[dict]) -> float:
    """Wall time of one plain forward+backward (HF loss, ``.backward()``) over ``loader``."""
    device = next(model.parameters()).device
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(True)
    try:
        _sync(device)
        start = time.perf_counter()
        for batch in loader:
            batch = move_to_device(batch, device)
            loss = model(**batch).loss
            loss.backward()
        _sync(device)
        seconds = time.perf_counter() - start
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.grad = None
            p.requires_grad_(flag)
    return seconds


def _earlier_bench_json(path: str) -> bool:
    """Whether ``path`` holds what an earlier ``lora-da bench --json`` wrote."""
    try:
        if os.path.getsize(path) > 1 << 20:
            return False
        with open(path, encoding="utf-8") as f:
            numbers = json.load(f)
    except (OSError, ValueError):
        return False
    if not isinstance(numbers, dict):
        return False
    return numbers.get("command") == BENCH_COMMAND or {"model", "seconds", "backends", "tokens"} <= set(numbers)


def check_json_out(path: str) -> None:
    """Refuse a ``--json`` path before any work: a link, a directory, a missing or
    unwritable directory, or an existing file other than an earlier bench JSON."""
    target = os.path.abspath(path)
    if os.path.islink(target):
        raise UsageError(f"--json {path} is a symbolic link; pass the file itself")
    if os.path.isdir(target):
        raise UsageError(f"--json {path} is a directory")
    if not os.path.isdir(os.path.dirname(target)):
        raise UsageError(f"--json {path}: directory {os.path.dirname(target)} does not exist")
    check_parent(target, "--json")
    if os.path.lexists(target) and not (os.path.isfile(target) and _earlier_bench_json(target)):
        raise UsageError(f"--json {path} exists and is not an earlier lora-da bench output; choose another file")


def write_json_atomically(path: str, numbers: dict) -> None:
    """Write ``numbers`` to ``path`` through a temporary file renamed into place
    (with the user's umask)."""
    target = os.path.abspath(path)

    def write(temporary: str) -> None:
        with open(temporary, "w") as f:
            json.dump(numbers, f, indent=2)

    write_atomically(target, write, prefix=f".{os.path.basename(target)}.lora-da-tmp-")


def cmd_bench(args: argparse.Namespace) -> int:
    """``lora-da bench``: print the init's phase times next to one plain
    forward+backward pass (and write them to ``--json``); returns the exit code."""
    if args.json:
        check_json_out(args.json)
    if isinstance(args.data, str) and not os.path.isfile(args.data):
        raise UsageError(f"data file {args.data} does not exist")
    model, tokenizer = load_model_and_tokenizer(args.model, args.dtype, args.device)
    max_length = resolve_max_length(model, args.max_length)
    samples = encode_data(args.data, tokenizer, args.samples, max_length, truncate=not args.no_truncate)
    loader = make_loader(samples, tokenizer, args.batch_size)
    tokens = sum(int(b["attention_mask"].sum()) for b in loader)
    train_size = args.train_size or count_rows(args.data)

    if args.warmup:
        plain_pass_seconds(model, loader[:1])
    plain = plain_pass_seconds(model, loader)
    try:
        init = initialize(
            model,
            loader,
            rank=args.rank,
            target_modules=target_modules_arg(args.target_modules),
            train_size=train_size,
            progress=not args.quiet,
        )
    except ValueError as error:
        raise UsageError(str(error)) from None
    rows = [
        ("plain forward+backward", plain),
        ("lora-da statistics pass", init.timings["forward_backward"] + init.timings["statistics_accumulate"]),
        ("  of which accumulation", init.timings["statistics_accumulate"]),
        ("lora-da factor prep", init.timings["factor_prep"]),
        ("lora-da solves", init.timings["solve"]),
        ("lora-da total", init.timings["total"]),
    ]
    device = str(next(model.parameters()).device)
    print(
        f"{args.model} ({device}, {args.dtype}): {len(samples)} samples, {tokens} tokens, "
        f"{len(loader)} batches of {args.batch_size}; rank {args.rank}, {len(init.modules)} modules"
    )
    print(f"{'phase':<26} {'seconds':>9} {'x plain pass':>13} {'tokens/s':>10}")
    for name, seconds in rows:
        rate = f"{tokens / seconds:>10.0f}" if "pass" in name or "total" in name else f"{'':>10}"
        print(f"{name:<26} {seconds:>9.3f} {seconds / plain:>13.2f} {rate}")
    print(f"init overhead: {init.timings['total'] / plain:.2f}x one plain forward+backward pass")
    if init.memory is not None:
        print(init.memory.summary())
    if args.json:
        numbers = {
            "command": BENCH_COMMAND,
            "model": os.path.abspath(args.model),
            "device": device,
            "dtype": args.dtype,
            "samples": len(samples),
            "tokens": tokens,
            "batch_size": args.batch_size,
            "rank": args.rank,
            "modules": len(init.modules),
            "seconds": dict(rows),
            "backends": init.backends,
            "memory_bytes": init.memory.as_dict() if init.memory is not None else None,
        }
        try:
            write_json_atomically(args.json, numbers)
        except OSError as error:
            raise UsageError(f"cannot write --json {args.json}: {error.strerror or error}") from None
    return 0
