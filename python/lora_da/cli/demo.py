"""``lora-da demo``: SmolLM2-135M-Instruct on GSM8K-style problems, offline
(``--tiny``: a built-in tiny random Llama, no extra packages)."""

from __future__ import annotations

import argparse
import time

import torch

from ..api import initialize
from ..demo_assets import MissingAsset, gsm_rows, smollm2_dir
from ..models import batches, synthetic_samples, tiny_llama
from ..peft_glue import get_peft_model_with_init
from .errors import UsageError
from .init import print_result, run_init
from .output import REPLACE_OWN_OUTPUT


def cmd_demo(args: argparse.Namespace) -> int:
    """``lora-da demo``: ``lora-da init`` on SmolLM2 and GSM8K-style rows (or the
    tiny-model demo with ``--tiny``); returns the exit code."""
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
    args.overwrite = args.overwrite or REPLACE_OWN_OUTPUT
    print(f"SmolLM2-135M-Instruct: {model_dir} (converted from GGUF and cached; ready in {prepare:.1f}s)")
    print(f"data: {args.samples} GSM8K-style problems from reasoning-gym (gsm_symbolic, seed {args.seed})")
    init, phases, out = run_init(args, rows, title="lora-da demo: SmolLM2-135M-Instruct on gsm_symbolic")
    phases = {"prepare assets": prepare, **phases}
    print_result(init, phases, out, model_dir)
    return 0


def tiny_demo(args: argparse.Namespace) -> int:
    """``lora-da demo --tiny``: the init of a tiny random Llama on synthetic
    samples, printed per module, then applied to a PEFT model when peft is installed."""
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
        peft_model = get_peft_model_with_init(model, init)
    except ImportError:
        print("(install peft to also apply the init to a PEFT model)")
        return 0
    with torch.no_grad():
        loss = peft_model(**loader[0]).loss
    print(f"PEFT model with the LoRA-DA init applied: loss on the first batch {float(loss):.4f}")
    return 0
