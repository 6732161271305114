"""Activation memory of the statistics pass with and without activation checkpointing (CPU).

    python bench/bench_checkpointing.py [--layers 8] [--seq 2048] [--batch 2] [--hidden 128] [--out FILE]

A tiny random Llama whose activations dominate (8 layers x 2048 tokens, hidden 128,
intermediate 512, vocab 256: 10 MB of weights). Every case runs in a fresh process
(``python bench/bench_checkpointing.py --child CASE``) and reports its peak RSS
(``ru_maxrss``) and its peak minus the RSS before the pass (model, data and imports
loaded); one thread each. Cases:

* ``train``: one plain training forward+backward per batch (every weight's gradient), the
  reference for what checkpointing saves in training;
* ``stats``: ``lora_da.collect_statistics`` on every linear layer but the head;
* each with ``gradient_checkpointing_enable(use_reentrant=False/True)``.

The checkpointed statistics are compared with the plain ones (largest relative error
over every module's G, Z and y). Prints a markdown table (and writes it to ``--out``).
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import markdown_table  # noqa: E402

CASES = ["train", "train-ckpt", "stats", "stats-ckpt", "stats-ckpt-reentrant"]


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(case: str, args) -> dict:
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    import lora_da
    from lora_da.models import tiny_llama
    from lora_da.targets import find_target_modules

    model = tiny_llama(
        hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_layers=args.layers, num_heads=4,
        num_kv_heads=4, vocab_size=256,
    )
    model.config.max_position_embeddings = args.seq
    generator = torch.Generator().manual_seed(0)
    loader = []
    for _ in range(args.batches):
        ids = torch.randint(3, 256, (args.batch, args.seq), generator=generator)
        loader.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    if "ckpt" in case:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": "reentrant" in case})
    before = current_rss_mib()
    start = time.perf_counter()
    result = {"case": case}
    if case.startswith("train"):
        model.train()
        for batch in loader:
            model(**batch).loss.backward()
    else:
        stats = lora_da.collect_statistics(model, loader, find_target_modules(model, None, rank=2))
        result["statistics_mib"] = stats.nbytes() / 2**20
        if args.compare is not None:
            reference = load_file(args.compare)  # written by the plain case
            worst = 0.0
            for name in stats.modules:
                for key, value in (
                    ("Z", stats.input_factor(name)), ("y", stats.output_factor_diag(name)), ("G", stats.gradient(name))
                ):
                    want = reference[f"{name}/{key}"]
                    worst = max(worst, float((value - want).norm() / want.norm()))
            result["max_rel_err"] = worst
        if args.save is not None:
            tensors = {}
            for n in stats.modules:
                tensors.update({f"{n}/Z": stats.input_factor(n), f"{n}/y": stats.output_factor_diag(n),
                                f"{n}/G": stats.gradient(n)})
            save_file({k: v.contiguous() for k, v in tensors.items()}, args.save)
    result["seconds"] = time.perf_counter() - start
    result["rss_before_mib"] = before
    result["peak_rss_mib"] = rss_mib()
    return result


def run_case(case: str, args, extra) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--child", case] + extra
    for key in ("layers", "seq", "batch", "hidden", "batches"):
        command += [f"--{key}", str(getattr(args, key))]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--save", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--compare", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        reference = os.path.join(tmp, "plain.safetensors")
        results = []
        for case in CASES:
            extra = []
            if case == "stats":
                extra = ["--save", reference]
            elif case.startswith("stats-"):
                extra = ["--compare", reference]
            results.append(run_case(case, args, extra))
    rows = []
    for r in results:
        rows.append([
            r["case"],
            f"{r['rss_before_mib']:.0f}",
            f"{r['peak_rss_mib']:.0f}",
            f"{r['peak_rss_mib'] - r['rss_before_mib']:.0f}",
            f"{r['statistics_mib']:.1f}" if "statistics_mib" in r else "",
            f"{r['max_rel_err']:.1e}" if "max_rel_err" in r else "",
            f"{r['seconds']:.1f}",
        ])
    header = ["case", "RSS before (MiB)", "peak RSS (MiB)", "peak − before (MiB)", "statistics (MiB)",
              "max rel. err vs plain", "seconds"]
    text = (
        f"Llama {args.layers} layers, hidden {args.hidden}, intermediate {4 * args.hidden}, vocab 256, "
        f"{args.batches} batches x {args.batch} x {args.seq} tokens, float32, 1 thread, one fresh process per row\n\n"
        + markdown_table(header, rows)
    )
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write("# Activation checkpointing: peak RSS of the statistics pass\n\n"
                    "`python bench/bench_checkpointing.py --out bench/results/checkpointing_cpu.md`\n\n" + text + "\n")


if __name__ == "__main__":
    main()
