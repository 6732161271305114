"""Z = aᵀ diag(m) a on its lower triangle on the CPU: the compiled core's BLAS against the torch panels.

    python bench/bench_input_factor_cpu.py [--tokens 1024] [--dims 576 1536] [--threads 1 2] [--repeat 7]

For each width, accumulator dtype and thread count, the best of ``--repeat`` calls of
``kernels/kfac_stats_blas.accumulate_input_factor`` (``?syrk``) and of
``kernels/kfac_stats.accumulate_input_factor_lower`` (column panels), interleaved in one
process so that a changing load hits both alike; float32 activations as the pass hands
them (upcast for a float64 Z). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import markdown_table  # noqa: E402

from lora_da.kernels import kfac_stats, kfac_stats_blas  # noqa: E402


def best_seconds(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--dims", type=int, nargs="+", default=[576, 1536])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args(argv)
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for d_in in args.dims:
            a = torch.randn(args.tokens, d_in)
            for dtype in (torch.float64, torch.float32):
                z = torch.zeros(d_in, d_in, dtype=dtype)
                blas = panels = float("inf")
                for _ in range(2):  # interleaved rounds
                    blas = min(blas, best_seconds(lambda: kfac_stats_blas.accumulate_input_factor(z, a, None), args.repeat))
                    panels = min(panels, best_seconds(lambda: kfac_stats.accumulate_input_factor_lower(z, a, None), args.repeat))
                rows.append([threads, d_in, str(dtype).replace("torch.", ""), f"{panels * 1e3:.1f}", f"{blas * 1e3:.1f}", f"{panels / blas:.2f}x"])
    print(f"Z += aᵀa on the lower triangle, {args.tokens} tokens, torch {torch.__version__}\n")
    print(markdown_table(["threads", "d_in", "Z dtype", "torch panels (ms)", "core BLAS (ms)", "speed-up"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
