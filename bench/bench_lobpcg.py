"""Batched LOBPCG (lora_da.solvers.lobpcg) vs a loop of torch.linalg.eigh vs a
loop of torch.lobpcg(niter=10), on batches of symmetric matrices with a slowly
decaying spectrum (λ_i = −exp(−8i/n), known eigenvectors), k = 8.

    python bench/bench_lobpcg.py                       # n in {576, 1536, 4096}, batch 30
    python bench/bench_lobpcg.py --sizes 1536 --output bench/results/lobpcg_cpu.md

Reports wall time for the whole batch and the largest principal angle (over
the batch) between each method's k-dimensional subspace and the exact one.
Where a loop would take very long (``--sample``), it runs on the first few
problems only and its time is scaled to the batch (marked "*").
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from problems import largest_principal_angle, matrices_with_spectrum, slowly_decaying_spectrum  # noqa: E402
from timing import Timer  # noqa: E402

from lora_da.solvers import lobpcg  # noqa: E402


def machine_description() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    memory = ""
    try:
        with open("/proc/meminfo") as info:
            memory = f", {int(info.readline().split()[1]) / 2**20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    return (
        f"{model}, {os.cpu_count()} cores{memory}; torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), Python {platform.python_version()}"
    )


def run_size(n: int, batch: int, k: int, sample: int, tol: float | None) -> list[tuple]:
    distinct = batch if n <= 1536 else 3
    spectrum = slowly_decaying_spectrum(n).expand(batch, n).contiguous()
    matrices, bases = matrices_with_spectrum(spectrum, seed=n, distinct_bases=distinct)
    exact = bases[..., :k]
    rows = []

    with Timer() as timer:
        result = lobpcg(matrices, k, tol=tol)
    elapsed = timer.seconds
    angle = largest_principal_angle(exact, result.eigenvectors).max().item()
    rows.append(
        (n, f"lora_da.lobpcg (batched, fp64, block {result.block_size})", elapsed, False, angle,
         f"{int(result.iterations.min())}-{int(result.iterations.max())} it, all converged: {bool(result.converged.all())}")
    )

    count = min(batch, sample)
    vectors = []
    with Timer() as timer:
        for b in range(count):
            vectors.append(torch.linalg.eigh(matrices[b])[1][:, :k])
    elapsed = timer.seconds * batch / count
    angle = largest_principal_angle(exact[:count], torch.stack(vectors)).max().item()
    rows.append((n, "loop of torch.linalg.eigh (fp64)", elapsed, count < batch, angle, f"{count} of {batch} run"))

    vectors = []
    with Timer() as timer:
        for b in range(batch):
            vectors.append(torch.lobpcg(matrices[b], k=k, niter=10, largest=False)[1])
    elapsed = timer.seconds
    angle = largest_principal_angle(exact, torch.stack(vectors)).max().item()
    rows.append((n, "loop of torch.lobpcg(niter=10) (fp64)", elapsed, False, angle, ""))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[576, 1536, 4096])
    parser.add_argument("--batch", type=int, default=30)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--sample", type=int, default=None,
                        help="for n > 1536, run the eigh loop on this many problems and scale (default 3); "
                        "smaller n always run all")
    parser.add_argument("--tol", type=float, default=None, help="LOBPCG tolerance (default: the solver's)")
    parser.add_argument("--output", default=None, help="also write the table (markdown) here")
    args = parser.parse_args(argv)

    lines = [
        f"Machine: {machine_description()}",
        "",
        f"Batch of {args.batch} problems, k = {args.k}, spectrum λ_i = −exp(−8i/n); "
        "time for the whole batch; angle = largest principal angle to the exact eigenspace over the batch.",
        "",
        "| n | method | time (s) | speed-up of lora_da.lobpcg | largest angle (rad) | notes |",
        "|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    for n in args.sizes:
        sample = args.batch if n <= 1536 else (args.sample if args.sample is not None else 3)
        rows = run_size(n, args.batch, args.k, sample, args.tol)
        ours = rows[0][2]
        for size, method, elapsed, scaled, angle, notes in rows:
            line = (f"| {size} | {method} | {elapsed:.2f}{'*' if scaled else ''} | {elapsed / ours:.1f}x | "
                    f"{angle:.2e} | {notes} |")
            lines.append(line)
            print(line, flush=True)
    lines += ["", "\\* measured on the first problems only, scaled to the batch."]
    print(lines[-1])
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as out:
            out.write("# Batched LOBPCG on CPU\n\n`python " + " ".join(["bench/bench_lobpcg.py"] + (argv or sys.argv[1:])) + "`\n\n")
            out.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
