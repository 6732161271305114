"""Run the missing runs of the convergence grid, N subprocesses at a time.

    python bench/convergence/driver.py --workers 2 --lrs 5e-4,1e-4 \
        --methods lora-da,lora,pissa,lora-ga,lora-one,milora,cntlora,fisher-subspace \
        --extra-seeds-for lora-da,lora --other-lr-methods lora-da,lora

Order (= priority): for the first LR every method with seed 0 in ``--methods`` order,
then seeds ``--extra-seeds`` of ``--extra-seeds-for``; for each further LR the methods
of ``--other-lr-methods`` (default: all) with seed 0 (plus extra seeds with
``--extra-seeds-all-lrs``). Runs whose JSON exists are skipped. Each run is
``run_one.py`` with OMP_NUM_THREADS=1, its output in ``OUT/logs/<run>.log``.
Options after ``--`` go to every ``run_one.py`` unchanged.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import run_name  # noqa: E402


def log(message: str) -> None:
    print(time.strftime("%Y-%m-%d %H:%M:%S"), message, flush=True)


def plan(args) -> list:
    methods = args.methods.split(",")
    extra_for = [m for m in args.extra_seeds_for.split(",") if m]
    extra_seeds = [int(s) for s in args.extra_seeds.split(",") if s]
    other = args.other_lr_methods.split(",") if args.other_lr_methods else methods
    jobs = []
    for index, lr in enumerate(float(x) for x in args.lrs.split(",")):
        chosen = methods if index == 0 else [m for m in methods if m in other] + [m for m in other if m not in methods]
        jobs += [(m, lr, 0) for m in chosen]
        if index == 0 or args.extra_seeds_all_lrs:
            jobs += [(m, lr, s) for s in extra_seeds for m in extra_for if m in chosen]
    return jobs


def main() -> int:
    argv = sys.argv[1:]
    passthrough = []
    if "--" in argv:
        cut = argv.index("--")
        argv, passthrough = argv[:cut], argv[cut + 1:]
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--lrs", default="5e-4,1e-4")
    p.add_argument("--methods", default="lora-da,lora,pissa,lora-ga,lora-one,milora,cntlora,fisher-subspace")
    p.add_argument("--extra-seeds-for", default="lora-da,lora")
    p.add_argument("--extra-seeds", default="1")
    p.add_argument("--other-lr-methods", default="", help="methods run at the LRs after the first (default: all)")
    p.add_argument("--extra-seeds-all-lrs", action="store_true")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--out", default="bench/results/convergence_runs/")
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)

    logs = os.path.join(args.out, "logs")
    os.makedirs(logs, exist_ok=True)
    jobs = plan(args)
    pending = [j for j in jobs if not os.path.exists(os.path.join(args.out, run_name(*j) + ".json"))]
    log(f"{len(jobs)} runs in the grid, {len(pending)} missing, {args.workers} workers: "
        + ", ".join(run_name(*j) for j in pending))
    if args.dry_run:
        return 0
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    running = {}
    failures = []
    start = time.time()
    while pending or running:
        while pending and len(running) < args.workers:
            method, lr, seed = pending.pop(0)
            name = run_name(method, lr, seed)
            cmd = [sys.executable, os.path.join(HERE, "run_one.py"), "--method", method, "--lr", repr(lr),
                   "--seed", str(seed), "--steps", str(args.steps), "--out", args.out, "--threads", "1", *passthrough]
            handle = open(os.path.join(logs, name + ".log"), "a")
            handle.write(f"# {' '.join(cmd)}\n")
            handle.flush()
            proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env)
            running[proc] = (name, handle, time.time())
            log(f"started {name} (pid {proc.pid})")
        time.sleep(5)
        for proc in [p for p in running if p.poll() is not None]:
            name, handle, began = running.pop(proc)
            handle.close()
            minutes = (time.time() - began) / 60
            if proc.returncode:
                failures.append(name)
                log(f"FAILED {name} (exit {proc.returncode}, {minutes:.1f} min; see {logs}/{name}.log)")
            else:
                log(f"done {name} ({minutes:.1f} min)")
    log(f"all done in {(time.time() - start) / 60:.1f} min; failures: {failures or 'none'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
