"""CPU benchmark of Z's float64 accumulation: the core's dsyrk (``kernels/kfac_stats_cpu.py``)
against torch's panels of ``addmm`` (``kernels/kfac_stats.accumulate_input_factor_lower``).

    python bench/bench_kfac_cpu.py [--rows 1024] [--threads 2] [--repeat 3]

One "batch" is what the SmolLM2-135M statistics pass accumulates for ``--rows`` rows:
per layer three inputs of d_in 576 (attention input, o_proj input, MLP input) and one of
1536 (down_proj input), 30 layers, float32 activations cast to float64 as the pass does.
The inputs are cycled so that they are not all in cache, and the two paths are timed
alternately in one process (the machine is shared: compare the ratio, not the seconds).
The first call of each path is a warm-up. Prints a table; seconds per batch.
"""

from __future__ import annotations

import argparse
import time

import torch

from lora_da.kernels import kfac_stats, kfac_stats_cpu

SHAPES = (576, 576, 576, 1536)
LAYERS = 30


def one_batch(accumulate, inputs, sums) -> float:
    start = time.perf_counter()
    for layer in range(LAYERS):
        for slot, d_in in enumerate(SHAPES):
            accumulate(sums[slot], inputs[d_in][(layer + slot) % len(inputs[d_in])], None)
    return time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    inputs = {d: [torch.randn(args.rows, d, generator=generator) for _ in range(4)] for d in set(SHAPES)}
    sums = [torch.zeros(d, d, dtype=torch.float64) for d in SHAPES]
    paths = {"torch panels (addmm)": kfac_stats.accumulate_input_factor_lower,
             "core dsyrk": kfac_stats_cpu.accumulate_input_factor_lower}
    times = {name: [] for name in paths}
    for name, accumulate in paths.items():
        one_batch(accumulate, inputs, sums)  # warm-up
    for _ in range(args.repeat):
        for name, accumulate in paths.items():
            times[name].append(one_batch(accumulate, inputs, sums))
    base = min(times["torch panels (addmm)"])
    print(f"Z in float64, SmolLM2 shapes, {args.rows} rows per batch, {args.threads} threads, best of {args.repeat}")
    print("| path | s per batch (best) | all runs | vs panels |")
    print("|---|---|---|---|")
    for name, values in times.items():
        runs = ", ".join(f"{v:.3f}" for v in values)
        print(f"| {name} | {min(values):.3f} | {runs} | {min(values) / base:.2f}x |")


if __name__ == "__main__":
    main()
