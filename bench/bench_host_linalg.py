"""LoRA-DA's batched float64 Cholesky and solves on the CPU: the compiled core's OpenBLAS against torch.

    python bench/bench_host_linalg.py [--batch 30] [--threads 2] [--repeat 3]

At SmolLM2-135M's shapes (30 layers; d_in 576 with d_out 576 / 1536, d_in 1536 with
d_out 576): ``lora_da.host_linalg.cholesky_lower`` against ``torch.linalg.cholesky_ex``,
and the in-place ``host_linalg.cholesky_solve_`` on both of its backends (``core``:
OpenBLAS; ``torch``: ``solve_triangular`` into the right-hand sides) against the batched
``torch.cholesky_solve``, the best of ``--repeat``, interleaved in one process. Prints a
markdown table and the backend ``host_linalg.solve_backend()`` picks on this machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import markdown_table  # noqa: E402

from lora_da import host_linalg  # noqa: E402


def best_seconds(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for d_in, d_out in ((576, 576), (576, 1536), (1536, 576)):
        generator = torch.Generator().manual_seed(d_in + d_out)
        a = torch.randn(args.batch, 2 * d_in, d_in, generator=generator, dtype=torch.float64)
        z = a.mT @ a / (2 * d_in)
        del a
        core_factor = best_seconds(lambda: host_linalg.cholesky_lower(z), args.repeat)
        torch_factor = best_seconds(lambda: torch.linalg.cholesky_ex(z, upper=True), args.repeat)
        factor, _ = host_linalg.cholesky_lower(z)
        gradient = torch.randn(args.batch, d_out, d_in, generator=generator, dtype=torch.float64)
        work = gradient.clone()
        core_solve = best_seconds(lambda: host_linalg.cholesky_solve_(work, factor, backend="core"), args.repeat)
        in_place_solve = best_seconds(lambda: host_linalg.cholesky_solve_(work, factor, backend="torch"), args.repeat)
        torch_solve = best_seconds(lambda: torch.cholesky_solve(gradient.mT, factor.mT, upper=True), args.repeat)
        rows.append([f"{args.batch} x {d_in}", f"{torch_factor:.3f}", f"{core_factor:.3f}", f"{torch_factor / core_factor:.2f}x",
                     d_out, f"{torch_solve:.3f}", f"{core_solve:.3f}", f"{in_place_solve:.3f}"])
    print(f"float64, {args.threads} threads, torch {torch.__version__}; "
          f"host_linalg.solve_backend() here: {host_linalg.solve_backend()!r}\n")
    print(markdown_table(["batch x d_in", "torch cholesky (s)", "core cholesky (s)", "core speed-up", "d_out",
                          "torch.cholesky_solve (s)", "solve, core (s)", "solve, torch in place (s)"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
