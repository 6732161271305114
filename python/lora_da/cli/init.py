"""``lora-da init``: the LoRA-DA init of a Hugging Face causal LM on a JSONL
file, written as a PEFT adapter directory plus reports."""

from __future__ import annotations

import argparse
import logging
import os
import time
import warnings
from typing import Dict, List, Optional, Sequence, Tuple, Union

from torch import nn

from ..api import initialize
from ..config import LoraDAConfig
from ..layers import linear_dims
from ..report import write_report
from ..result import LoraInit
from ..targets import find_target_modules
from ..user_warnings import TargetsWarning
from .errors import UsageError
from .hf_model import check_model_dir, load_model_and_tokenizer, resolve_max_length
from .inputs import count_rows, encode_data, make_loader
from .output import AtomicDirectory, check_out

logger = logging.getLogger(__name__)


def target_modules_arg(values: Optional[List[str]]) -> Union[None, str, List[str]]:
    """``--target-modules`` as ``initialize`` takes it: ``None`` (the default
    targets), one regular expression, or module names (commas also split)."""
    if not values:
        return None
    if len(values) == 1 and any(ch in values[0] for ch in "*+?[]()|^$\\"):
        return values[0]  # a regular expression
    names = []
    for value in values:
        names += [v for v in value.split(",") if v]
    return names


def _extra_eigenvalues(model: nn.Module, args: argparse.Namespace) -> int:
    """How many eigenvalues past r to compute for the report (clamped to the modules' sizes)."""
    with warnings.catch_warnings():  # initialize() warns about what the targets leave out, once
        warnings.simplefilter("ignore", TargetsWarning)
        modules = find_target_modules(model, target_modules_arg(args.target_modules), args.rank)
    room = min(min(linear_dims(m)) for m in modules.values()) - args.rank
    return max(0, min(args.report_eigenvalues, room))


def compute_init(
    model: nn.Module, loader: Sequence[dict], args: argparse.Namespace, train_size: int, progress: bool
) -> LoraInit:
    """``lora_da.initialize`` with the CLI's options; asks for a few eigenpairs past
    ``r`` (``--report-eigenvalues``) and keeps the rank-``r`` init (:meth:`LoraInit.truncate`)."""
    method = getattr(args, "method", LoraDAConfig().method)
    try:
        extra = _extra_eigenvalues(model, args) if method == "lora-da" else 0
    except ValueError as error:
        raise UsageError(str(error)) from None
    try:
        init = initialize(
            model,
            loader,
            rank=args.rank + extra,
            target_modules=target_modules_arg(args.target_modules),
            alpha=args.alpha,
            beta=args.beta,
            gamma=args.gamma,
            damping=args.damping,
            train_size=train_size,
            token_mask=args.token_mask,
            seed=args.seed,
            progress=progress,
            method=method,
        )
    except ValueError as error:  # option values rejected by LoraDAConfig
        raise UsageError(str(error)) from None
    return init.truncate(args.rank) if extra else init


def run_init(
    args: argparse.Namespace, data: Union[str, List[dict]], *, title: Optional[str] = None
) -> Tuple[LoraInit, Dict[str, float], str]:
    """Everything ``lora-da init`` does; ``data`` is a JSONL path or a list of rows.
    Returns the init, the seconds of each phase (they add up to the run's wall
    time, see :func:`print_result`) and the absolute ``--out``."""
    data_path = data if isinstance(data, str) else None
    check_model_dir(args.model)
    check_out(args.out, args.overwrite, model=args.model, data=data_path)
    if args.rank < 1:
        raise UsageError(f"--rank must be positive, got {args.rank}")
    if args.samples < 1:
        raise UsageError(f"--samples must be positive, got {args.samples}")
    if data_path is not None and not os.path.isfile(data_path):
        raise UsageError(f"data file {data_path} does not exist")
    progress = not args.quiet
    phases: Dict[str, float] = {}

    start = time.perf_counter()
    logger.info("loading %s", args.model)
    model, tokenizer = load_model_and_tokenizer(args.model, args.dtype, args.device)
    phases["load model"] = time.perf_counter() - start

    start = time.perf_counter()
    max_length = resolve_max_length(model, args.max_length)
    samples = encode_data(data, tokenizer, args.samples, max_length, truncate=not args.no_truncate)
    cut = sum(s.truncated for s in samples)
    if cut:
        logger.info("%d of %d samples were cut to --max-length %d", cut, len(samples), max_length)
    loader = make_loader(samples, tokenizer, args.batch_size)
    num_tokens = sum(int(s.input_ids.numel()) for s in samples)
    logger.info("%d samples, %d tokens, %d batches", len(samples), num_tokens, len(loader))
    train_size = args.train_size
    if train_size is None:
        train_size = count_rows(data) if data_path is not None else len(data)
        logger.info("train_size N = %d (the rows of the data); pass --train-size for your fine-tuning set", train_size)
    phases["tokenize"] = time.perf_counter() - start

    init = timed_init(model, loader, args, train_size, progress, phases)
    extra = {
        "command": "lora-da " + args.command,
        "model": os.path.abspath(args.model),
        "data": os.path.abspath(data) if data_path is not None else "<built-in>",
        "max_length": max_length,
        "batch_size": args.batch_size,
        "dtype": args.dtype,
        "device": str(next(model.parameters()).device),
        "lora_alpha": args.lora_alpha,
        "use_rslora": args.use_rslora,
        "truncated_samples": cut,
    }
    write_output(init, args, phases, extra, base_model=os.path.abspath(args.model), title=title)
    return init, phases, os.path.abspath(args.out)


def timed_init(
    model: nn.Module,
    loader: Sequence[dict],
    args: argparse.Namespace,
    train_size: int,
    progress: bool,
    phases: Dict[str, float],
) -> LoraInit:
    """:func:`compute_init`, its time booked into ``phases``: ``statistics``,
    ``factor prep`` and ``solve`` from ``init.timings``, and ``init setup`` the
    rest of the call (finding the targets, planning the passes, the result)."""
    start = time.perf_counter()
    init = compute_init(model, loader, args, train_size, progress)
    seconds = time.perf_counter() - start
    phases["statistics"] = init.timings["forward_backward"] + init.timings["statistics_accumulate"]
    phases["factor prep"] = init.timings["factor_prep"]
    phases["solve"] = init.timings["solve"]
    phases["init setup"] = max(seconds - phases["statistics"] - phases["factor prep"] - phases["solve"], 0.0)
    return init


def write_output(
    init: LoraInit,
    args: argparse.Namespace,
    phases: Dict[str, float],
    extra: Dict[str, object],
    *,
    base_model: Optional[str],
    title: Optional[str] = None,
) -> None:
    """Write the adapter and the report to ``args.out`` atomically (see
    :mod:`.output`); books ``save`` (the adapter) and ``write report`` into
    ``phases`` (the report's ``phases_s`` has the phases up to ``save``).
    An error writing there is a one-line :class:`UsageError`."""
    start = time.perf_counter()
    staging = None
    try:
        staging = AtomicDirectory(args.out, command=str(extra.get("command", "lora-da")))
        init.save_pretrained(
            staging.path,
            lora_alpha=args.lora_alpha,
            use_rslora=args.use_rslora,
            base_model_name_or_path=base_model,
        )
        phases["save"] = time.perf_counter() - start
        start = time.perf_counter()
        visual = not args.no_visual and init.method == "lora-da"  # the plots show Ω's spectrum
        write_report(init, staging.path, extra=extra, phases=phases, title=title, visual=visual)
        staging.commit()
        phases["write report"] = time.perf_counter() - start
    except OSError as error:
        if staging is not None:
            staging.discard()
        raise UsageError(f"cannot write --out {args.out}: {error.strerror or error} ({error.filename or args.out})") from None
    except BaseException:
        if staging is not None:
            staging.discard()
        raise


def print_result(
    init: LoraInit, phases: Dict[str, float], out: str, model_dir: Optional[str], *, base: Optional[str] = None
) -> None:
    """The init's summary, the phase times, what was written and how to load it.

    The table's rows add up to its ``total``, the wall time of the whole run
    (loading, tokenizing, saving included); the ``total`` on the summary's
    ``phases`` line is ``lora_da.initialize`` alone, printed again below the
    table. ``base``: the Python expression of the base model when there is no
    ``model_dir``."""
    print(init.summary())
    total = sum(phases.values())
    print(f"{'phase':<15} {'seconds':>9}")
    for phase, seconds in phases.items():
        print(f"{phase:<15} {seconds:>9.2f}")
    print(f"{'total':<15} {total:>9.2f}  (the whole run: loading, tokenizing and saving included)")
    print(
        f"{'initialize':<15} {init.timings['total']:>9.2f}  "
        "(of it, lora_da.initialize alone: the total on the summary's phases line)"
    )
    print(f"tokens/s in the statistics pass: {init.num_tokens / max(phases['statistics'], 1e-9):.0f}")
    print(f"wrote {out}: " + ", ".join(sorted(os.listdir(out))))
    if base is None:
        base = f"AutoModelForCausalLM.from_pretrained({model_dir!r})"
    print(f"load it with: PeftModel.from_pretrained({base}, {out!r}, is_trainable=True)")


def cmd_init(args: argparse.Namespace) -> int:
    """``lora-da init``: write the adapter and the report to ``--out``; returns the exit code."""
    init, phases, out = run_init(args, args.data)
    print_result(init, phases, out, os.path.abspath(args.model))
    return 0
