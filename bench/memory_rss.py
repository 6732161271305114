"""Process memory of ``lora_da.initialize()`` against one plain training forward+backward.

    python bench/memory_rss.py --case two-layer          # 2-layer Llama, hidden 1024 (a minute)
    python bench/memory_rss.py --case smollm2            # SmolLM2-135M, 32 x 256 tokens, batch 4 (~7 GB)
    python bench/memory_rss.py --case smollm2 --output bench/results/memory_smollm2_cpu.md

Each measurement runs in a FRESH Python process (this script re-runs itself with
``--child``), on the same model and batches:

* **plain** — one plain training forward+backward over all batches: every
  parameter trainable, the HF loss, ``.backward()`` per batch, the gradients
  held to the end (what a training step holds, without the optimizer);
* **init** — ``lora_da.initialize(model, loader, rank=8)`` with its defaults.

The child reports its peak RSS (``getrusage(RUSAGE_SELF).ru_maxrss``: the
kernel's high-water mark of the whole process, Python, torch and the model
included), its RSS after the model and data are loaded, and for **init**
``init.statistics_bytes`` and ``init.memory`` (the peak of each phase). The
checks printed at the end are the ones of issue 17:

* SmolLM2: init's peak RSS <= plain's peak RSS + statistics_bytes;
* 2-layer: init's RSS growth (peak - RSS after load) <= 2.5 x statistics_bytes + 200 MiB.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from typing import List, Tuple

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
MIB = 2**20
RANK = 8


def two_layer_case() -> Tuple[torch.nn.Module, List[dict], str]:
    """A 2-layer Llama from a tiny config: hidden 1024, intermediate 4096; 4 batches x 2 x 64 tokens."""
    from lora_da.models import batches, tiny_llama

    model = tiny_llama(hidden_size=1024, intermediate_size=4096, num_layers=2, num_heads=16, num_kv_heads=16).eval()
    generator = torch.Generator().manual_seed(0)
    samples = []
    for _ in range(8):
        ids = torch.randint(3, 128, (64,), generator=generator)
        samples.append({"input_ids": ids, "labels": ids.clone()})
    return model, list(batches(samples, 2)), "2-layer Llama (hidden 1024, intermediate 4096), 4 batches x 2 x 64 tokens"


def smollm2_case() -> Tuple[torch.nn.Module, List[dict], str]:
    sys.path.insert(0, HERE)
    from bench_init_overhead import smollm2_case as make

    return make(32, 256)


def _current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def child(case: str, mode: str) -> dict:
    """One measurement in this (fresh) process; returns what it saw."""
    torch.manual_seed(0)
    model, loader, what = (smollm2_case if case == "smollm2" else two_layer_case)()
    after_load = _current_rss()
    peak_at_load = _peak_rss()
    numbers = {"case": what, "mode": mode, "rss_after_load": after_load, "peak_after_load": peak_at_load}
    if mode == "plain":
        for p in model.parameters():
            p.requires_grad_(True)
        for batch in loader:
            model(**batch).loss.backward()  # gradients accumulate and are held
        numbers["gradient_bytes"] = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    else:
        import lora_da

        init = lora_da.initialize(model, loader, rank=RANK, progress=False)
        numbers["statistics_bytes"] = init.statistics_bytes
        numbers["passes"] = init.passes
        memory = getattr(init, "memory", None)
        numbers["memory"] = memory.as_dict() if memory is not None else None
        numbers["timings"] = dict(init.timings)
    numbers["peak_rss"] = _peak_rss()
    return numbers


def run_child(case: str, mode: str) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--case", case, "--child", mode]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _mib(count: int) -> str:
    return f"{count / MIB:,.0f}"


def table(case: str, plain: dict, init: dict) -> List[str]:
    stats = init["statistics_bytes"]
    lines = [
        f"# Process memory: {init['case']}",
        "",
        f"`python bench/memory_rss.py --case {case}`; torch {torch.__version__}, {platform.machine()}, "
        f"{os.cpu_count()} CPUs; each row a fresh process; peak RSS = getrusage ru_maxrss.",
        "",
        "| run | RSS after load (MiB) | peak RSS (MiB) | growth (MiB) |",
        "|---|---:|---:|---:|",
    ]
    for name, row in (("plain forward+backward (grads held)", plain), ("lora_da.initialize", init)):
        lines.append(
            f"| {name} | {_mib(row['rss_after_load'])} | {_mib(row['peak_rss'])} | "
            f"{_mib(row['peak_rss'] - row['rss_after_load'])} |"
        )
    lines += ["", f"statistics_bytes: {_mib(stats)} MiB; passes: {init['passes']}"]
    memory = init.get("memory")
    if memory:
        lines += [
            "",
            f"init.memory (peak {memory['measure']}, MiB): "
            + ", ".join(f"{k} {_mib(memory[k])}" for k in ("start", "statistics_pass", "factor_prep", "solve", "total")),
        ]
    growth = init["peak_rss"] - init["rss_after_load"]
    lines.append("")
    if case == "smollm2":
        bound = plain["peak_rss"] + stats
        verdict = "PASS" if init["peak_rss"] <= bound else "FAIL"
        lines.append(
            f"check: init peak {_mib(init['peak_rss'])} MiB <= plain peak + statistics = {_mib(bound)} MiB: {verdict}"
        )
    else:
        bound = 2.5 * stats + 200 * MIB
        verdict = "PASS" if growth <= bound else "FAIL"
        lines.append(f"check: init growth {_mib(growth)} MiB <= 2.5 x statistics + 200 MiB = {_mib(bound)} MiB: {verdict}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=["two-layer", "smollm2"], default="two-layer")
    parser.add_argument("--child", choices=["plain", "init"], help=argparse.SUPPRESS)
    parser.add_argument("--output", help="also write the table (markdown) to this file")
    parser.add_argument("--plain-from", help="reuse the plain run of an earlier run's JSON line (file)")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.case, args.child)))
        return
    if args.plain_from:
        with open(args.plain_from) as f:
            plain = json.loads(f.read().strip().splitlines()[-1])["plain"]
    else:
        plain = run_child(args.case, "plain")
    init = run_child(args.case, "init")
    lines = table(args.case, plain, init)
    print("\n".join(lines))
    print(json.dumps({"plain": plain, "init": init}))
    if args.output:
        with open(args.output, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
