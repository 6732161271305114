"""The ``lora-da`` command line (``python -m lora_da``)."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional


def _demo(args: argparse.Namespace) -> int:
    import torch

    from .api import initialize
    from .models import batches, synthetic_samples, tiny_llama

    torch.manual_seed(args.seed)
    model = tiny_llama(seed=args.seed)
    samples = synthetic_samples(args.samples, seed=args.seed)
    loader = list(batches(samples, args.batch_size))
    init = initialize(model, loader, rank=args.rank, train_size=args.train_size, progress=not args.quiet)
    print(init.summary())
    print(f"{'module':<40} {'d_in':>5} {'d_out':>5} {'sigma':>10}  smallest eigenvalue of Omega")
    for name, module in init.modules.items():
        print(
            f"{name:<40} {module.lora_A.shape[1]:>5} {module.lora_B.shape[0]:>5} "
            f"{module.sigma:>10.4g}  {float(module.eigenvalues[0]):.4g}"
        )
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        print("(install peft to also apply the init to a PEFT model)")
        return 0
    peft_model = get_peft_model(model, LoraConfig(r=args.rank, target_modules=list(init.modules)))
    init.apply(peft_model)
    batch = loader[0]
    with torch.no_grad():
        loss = peft_model(**batch).loss
    print(f"PEFT model with the LoRA-DA init applied: loss on the first batch {float(loss):.4f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora-da", description="Data-aware LoRA initialization (LoRA-DA).")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run LoRA-DA on a built-in tiny random Llama and print what it found")
    demo.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    demo.add_argument("--samples", type=int, default=32, help="calibration samples (default 32)")
    demo.add_argument("--batch-size", type=int, default=8, help="loader batch size (default 8)")
    demo.add_argument("--train-size", type=int, default=1000, help="fine-tuning set size N (default 1000)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
