"""``lora-da demo``: SmolLM2-135M-Instruct on GSM8K-style problems, offline
(``--tiny``: a built-in tiny random Llama, no extra packages); both write
``--out`` (default ``lora-da-demo``): the adapter and the report."""

from __future__ import annotations

import argparse
import os
import time
from typing import Dict

import torch

from ..demo_assets import MissingAsset, gsm_rows, smollm2_dir
from ..models import batches, synthetic_samples, tiny_llama
from ..peft_glue import get_peft_model_with_init
from .errors import UsageError
from .init import print_result, run_init, timed_init, write_output
from .output import REPLACE_OWN_OUTPUT, check_out


def cmd_demo(args: argparse.Namespace) -> int:
    """``lora-da demo``: ``lora-da init`` on SmolLM2 and GSM8K-style rows (or the
    tiny-model demo with ``--tiny``); returns the exit code. Both write ``--out``
    and replace only an earlier lora-da output there."""
    args.overwrite = args.overwrite or REPLACE_OWN_OUTPUT
    check_out(args.out, args.overwrite)  # before converting the model (seconds to minutes)
    if args.tiny:
        return tiny_demo(args)
    start = time.perf_counter()
    try:
        model_dir = smollm2_dir()
        rows = gsm_rows(args.samples, seed=args.seed)
    except MissingAsset as error:
        raise UsageError(str(error)) from None
    prepare = time.perf_counter() - start
    args.model = model_dir
    print(f"SmolLM2-135M-Instruct: {model_dir} (converted from GGUF and cached; ready in {prepare:.1f}s)")
    print(f"data: {args.samples} GSM8K-style problems from reasoning-gym (gsm_symbolic, seed {args.seed})")
    init, phases, out = run_init(args, rows, title="lora-da demo: SmolLM2-135M-Instruct on gsm_symbolic")
    phases = {"prepare assets": prepare, **phases}
    print_result(init, phases, out, model_dir)
    return 0


def tiny_demo(args: argparse.Namespace) -> int:
    """``lora-da demo --tiny``: the init of a tiny random Llama on synthetic
    samples, printed per module and written to ``--out`` like the demo (adapter
    and report), then applied to a PEFT model; returns the exit code."""
    if args.rank < 1:
        raise UsageError(f"--rank must be positive, got {args.rank}")
    if args.samples < 1:
        raise UsageError(f"--samples must be positive, got {args.samples}")
    phases: Dict[str, float] = {}
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    model = tiny_llama(seed=args.seed)
    phases["load model"] = time.perf_counter() - start
    start = time.perf_counter()
    samples = synthetic_samples(args.samples, seed=args.seed)
    loader = list(batches(samples, args.batch_size))
    phases["tokenize"] = time.perf_counter() - start
    train_size = args.train_size or 1000
    init = timed_init(model, loader, args, train_size, not args.quiet, phases)
    extra = {
        "command": "lora-da demo --tiny",
        "model": f"lora_da.models.tiny_llama(seed={args.seed})",
        "data": f"lora_da.models.synthetic_samples({args.samples}, seed={args.seed})",
        "batch_size": args.batch_size,
        "dtype": "float32",
        "device": str(next(model.parameters()).device),
        "lora_alpha": args.lora_alpha,
        "use_rslora": args.use_rslora,
    }
    write_output(init, args, phases, extra, base_model=None, title="lora-da demo --tiny: a tiny random Llama")
    print(f"{'module':<40} {'d_in':>5} {'d_out':>5} {'sigma':>10}  smallest eigenvalue of Omega")
    for name, module in init.modules.items():
        print(
            f"{name:<40} {module.lora_A.shape[1]:>5} {module.lora_B.shape[0]:>5} "
            f"{module.sigma:>10.4g}  {float(module.eigenvalues[0]):.4g}"
        )
    print_result(
        init, phases, os.path.abspath(args.out), None, base=f"lora_da.models.tiny_llama(seed={args.seed})"
    )
    try:
        peft_model = get_peft_model_with_init(model, init)
    except ImportError:
        print("(install peft to also apply the init to a PEFT model)")
        return 0
    with torch.no_grad():
        loss = peft_model(**loader[0]).loss
    print(f"PEFT model with the LoRA-DA init applied: loss on the first batch {float(loss):.4f}")
    return 0
