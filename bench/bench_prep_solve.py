"""LoRA-DA's preparation and solve alone, split into their steps, on saved SmolLM2 statistics.

    python bench/bench_prep_solve.py [--samples 32 --length 256] [--repeats 3] \
        [--statistics ~/.cache/lora-da/prep_solve_32x256.safetensors] [--output FILE]

The first run collects the statistics once (``initialize(..., stats_checkpoint=FILE)``, the
library's own checksummed safetensors format, about 1.2 GB at 32 x 256); later runs load them
and skip the pass, so one measurement of preparation + solve takes seconds, not the minute
of the whole job (``bench/accuracy_smollm2.py`` times that). Each repeat runs
``initialize`` on the loaded statistics with the default solver and prints the seconds of
``factor_prep`` and ``solve`` (``InitResult.timings``) and of the library functions inside
them, timed by wrapping them here (the wrappers only read the clock):

* ``stack``: the float64 copies of the statistics (``_stack_float64``);
* ``cholesky``: Z's batched Cholesky factorization and M's (``host_linalg.cholesky_lower*``);
* ``solve Z⁻¹Gᵀ``: the natural-gradient step by two triangular solves (``host_linalg.cholesky_solve_``);
* ``σ``: the subspace iteration for σ_max(Δ) (``spectral_norms_and_directions``);
* ``LOBPCG``: the compiled solver (``solvers.lobpcg``), with its iterations per batch;
* ``check``: the independent float64 residual check (``failed_eigenpairs``).

Run it on a quiet machine (stop background jobs): the steps are memory-bound, and a
neighbour changes them by tens of percent.
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import platform
import statistics as stats_module
import sys
import time
import warnings
from typing import Callable, Dict, List

import torch

import lora_da
import lora_da.methods.lora_da as lora_da_method
import lora_da.methods.lora_da_batched as batched
from lora_da import host_linalg

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_init_overhead import smollm2_case  # noqa: E402
from timing import markdown_table  # noqa: E402

RANK = 8
TRAIN_SIZE = 7473  # GSM8K's training set, as bench/accuracy_smollm2.py

STEPS = [  # (label, module, function name)
    ("stack", batched, "_stack_float64"),
    ("cholesky", host_linalg, "cholesky_lower"),
    ("cholesky", host_linalg, "cholesky_lower_"),
    ("solve Z⁻¹Gᵀ", host_linalg, "cholesky_solve_"),
    ("σ", batched, "spectral_norms_and_directions"),
    ("LOBPCG", lora_da_method, "lobpcg"),
    ("check", lora_da_method, "failed_eigenpairs"),
]


def wrap_steps(seconds: Dict[str, float], iterations: List[str]) -> Callable[[], None]:
    """Wraps the functions of ``STEPS`` so that they add their outermost calls' seconds to
    ``seconds`` (a nested call, e.g. ``cholesky_lower`` inside ``cholesky_lower_``, is not counted
    twice) and LOBPCG its iterations to ``iterations``; returns the function that unwraps them."""
    originals = []
    depth = collections.Counter()

    for label, module, name in STEPS:
        function = getattr(module, name)
        originals.append((module, name, function))

        def timed(*args, _function=function, _label=label, **kwargs):
            depth[_label] += 1
            start = time.perf_counter()
            try:
                result = _function(*args, **kwargs)
            finally:
                depth[_label] -= 1
                if depth[_label] == 0:
                    seconds[_label] += time.perf_counter() - start
            if _label == "LOBPCG":
                its = result.iterations.flatten().tolist()
                iterations.append(f"{tuple(args[0].delta.shape)}: median {int(stats_module.median(its))}, max {max(its)}")
            return result

        setattr(module, name, functools.wraps(function)(timed))

    def unwrap() -> None:
        for module, name, function in originals:
            setattr(module, name, function)

    return unwrap


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--statistics", metavar="FILE",
                        help="statistics checkpoint to write once and read back "
                             "(default ~/.cache/lora-da/prep_solve_<samples>x<length>.safetensors)")
    parser.add_argument("--output", help="also write the table to this Markdown file")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    path = args.statistics or os.path.expanduser(
        f"~/.cache/lora-da/prep_solve_{args.samples}x{args.length}.safetensors")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    model, loader, what = smollm2_case(args.samples, args.length)

    def run() -> Dict[str, float]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # escalations etc. are bench/accuracy_smollm2.py's business
            init = lora_da.initialize(model, loader, rank=RANK, train_size=TRAIN_SIZE, progress=False,
                                      stats_checkpoint=path)
        return dict(init.timings)

    if not os.path.exists(path):
        print(f"collecting the statistics once into {path} ...", flush=True)
        run()
    rows: Dict[str, List[float]] = collections.defaultdict(list)
    iterations: List[str] = []
    for repeat in range(args.repeats):
        seconds: Dict[str, float] = collections.defaultdict(float)
        unwrap = wrap_steps(seconds, iterations if repeat == 0 else [])
        try:
            timings = run()
        finally:
            unwrap()
        for key in ("factor_prep", "solve"):
            rows[key].append(timings.get(key, float("nan")))
        rows["prep + solve"].append(rows["factor_prep"][-1] + rows["solve"][-1])
        for label in dict.fromkeys(label for label, _, _ in STEPS):
            rows["– " + label].append(seconds[label])
        print(f"repeat {repeat + 1}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in rows.items()), flush=True)

    lines = [
        f"# Preparation and solve: {what}",
        "",
        f"`python bench/bench_prep_solve.py --samples {args.samples} --length {args.length} --repeats {args.repeats}`",
        "",
        f"Device: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; "
        f"torch {torch.__version__}; rank {RANK}, N {TRAIN_SIZE}; statistics read from a checkpoint.",
        "",
        markdown_table(["step", "median (s)", "runs (s)"], [
            [key, f"{stats_module.median(values):.2f}", " / ".join(f"{v:.2f}" for v in values)]
            for key, values in rows.items()
        ]),
        "",
        "LOBPCG iterations per batch (first repeat): " + "; ".join(iterations),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        from lora_da.atomic_files import write_atomically

        def write(temporary: str) -> None:
            with open(temporary, "w", encoding="utf-8") as handle:
                handle.write(text)

        write_atomically(args.output, write)


if __name__ == "__main__":
    main()
