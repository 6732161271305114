"""1 process vs N gloo processes on a tiny Llama (CPU): time and agreement.

    python bench/bench_distributed.py [--world 2] [--samples 64] [--layers 4]

Each rank gets 1/N of the batches and one thread (so N processes use N cores);
the single process gets all batches and one thread. Prints a table.
"""

import argparse
import os
import socket
import sys
import tempfile
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import lora_da
from lora_da.models import batches, synthetic_samples, tiny_llama

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import Timer, markdown_table  # noqa: E402


def make(args):
    model = tiny_llama(
        dtype=torch.float64, hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_layers=args.layers,
        vocab_size=256,
    )
    data = list(batches(synthetic_samples(args.samples, vocab_size=256, min_len=32, max_len=64, seed=0), 4))
    return model, data


def run_init(model, data, args):
    with Timer() as timer:
        init = lora_da.initialize(model, data, rank=8, train_size=1000, progress=False)
    return init, timer.seconds


def rank_main(rank, world, port, args, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=300))
    model, data = make(args)
    init, seconds = run_init(model, data[rank::world], args)
    if rank == 0:
        torch.save({"seconds": seconds, "timings": init.timings,
                    "factors": {n: (m.lora_A, m.lora_B, m.sigma) for n, m in init.modules.items()}}, out)
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128)
    args = parser.parse_args()

    torch.set_num_threads(1)
    model, data = make(args)
    single, single_seconds = run_init(model, data, args)

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rank0.pt")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.start_processes(rank_main, args=(args.world, port, args, out), nprocs=args.world, start_method="spawn")
        multi = torch.load(out, weights_only=False)

    worst_factor = max(
        float((multi["factors"][n][0] - m.lora_A).abs().max() / m.lora_A.abs().max()) for n, m in single.modules.items()
    )
    worst_sigma = max(abs(multi["factors"][n][2] - m.sigma) / m.sigma for n, m in single.modules.items())
    print(f"tiny Llama float64: {args.layers} layers, hidden {args.hidden}, {args.samples} samples, "
          f"{len(single.modules)} modules, {single.num_tokens} tokens; 1 thread per process")
    # LoraInit.timings phases: the statistics pass is forward_backward + statistics_accumulate,
    # the solve factor_prep + solve.
    def seconds(t, *phases):
        return f"{sum(t[p] for p in phases):.3f}"

    rows = []
    for processes, wall, t in ((1, single_seconds, single.timings), (args.world, multi["seconds"], multi["timings"])):
        rows.append([
            processes, f"{wall:.3f}", seconds(t, "forward_backward", "statistics_accumulate"),
            seconds(t, "all_reduce") if "all_reduce" in t else "-", seconds(t, "factor_prep", "solve"),
            seconds(t, "gather") if "gather" in t else "-",
        ])
    print(markdown_table(["processes", "init wall s", "statistics s", "all-reduce s", "solve s", "gather s"], rows))
    print(f"max relative difference vs 1 process: lora_A {worst_factor:.2e} (float32 factors), sigma {worst_sigma:.2e}")


if __name__ == "__main__":
    main()
