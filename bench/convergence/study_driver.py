"""Run the missing runs of the published-recipe study (issue #21), one at a time, resumable.

    nice -n 19 python bench/convergence/study_driver.py --out bench/results/convergence_runs_published/
    python bench/convergence/study_driver.py --dry-run      # what is done, missing, not yet known

The plan is recomputed after every run from the JSONs in ``--out`` (a run whose JSON
exists is never rerun; ``study_run.py`` writes it atomically at the end, so an
interrupted run is simply run again). Order = priority:

1. seed 0 at ``--first-lr`` (2e-4) for every arm of ``--arms``, in that order;
2. seed 0 at the other LRs of ``--lrs`` for every arm;
3. edge extension: when an arm's best LR (lowest final loss on the ``pick`` split, whole
   split; a diverged run counts as +inf) is the largest (smallest) LR it has, the next
   LR up (down) the ladder ``LADDER`` is added, up to ``--max-extend`` times per side;
4. seeds ``--extra-seeds`` at the best LR of every arm of ``--extra-seeds-for`` and of the
   best LoRA-DA variant (``VARIANTS``, ranked by their best pick loss), once the arm's
   seed-0 LRs (extensions included) are all done - until then they are listed as
   "not yet known".

Each run: ``study_run.py`` with ``OMP_NUM_THREADS=1`` (the driver's niceness is
inherited), its output appended to ``OUT/logs/<run>.log``; it imports this checkout's
``python/lora_da`` when that has a built ``_core`` (else the installed one; the JSON
records which, with its source hash and git commit). Options after ``--`` go to
every run unchanged (e.g. smoke-test sizes).
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import subprocess
import sys
import time
from typing import Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
from common import run_name  # noqa: E402

LADDER = [1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2]
VARIANTS = ["lora-da-lobpcg10", "lora-da-zrel1e-4", "lora-da-zrel1e-2"]
DEFAULT_ARMS = "lora-da,lora,lora-one,pissa,lora-da-lobpcg10,lora-da-zrel1e-2,lora-da-zrel1e-4"

Run = Tuple[str, float, int]


def log(message: str) -> None:
    print(time.strftime("%Y-%m-%d %H:%M:%S"), message, flush=True)


def read_result(out: str, run: Run) -> Optional[dict]:
    path = os.path.join(out, run_name(*run) + ".json")
    if not os.path.exists(path):
        return None
    with open(path) as handle:
        return json.load(handle)


def pick_loss(result: Optional[dict]) -> Optional[float]:
    """The run's LR-choice score (+inf when it diverged); None when not run."""
    if result is None:
        return None
    value = result.get("pick_loss")
    if result.get("diverged") or value is None or not math.isfinite(value):
        return math.inf
    return float(value)


def best_lr(out: str, arm: str, lrs: List[float], seed: int = 0) -> Optional[float]:
    """The LR of ``arm``'s lowest seed-``seed`` pick loss among ``lrs`` (None unless all are done)."""
    scores = {lr: pick_loss(read_result(out, (arm, lr, seed))) for lr in lrs}
    if any(v is None for v in scores.values()):
        return None
    return min(sorted(scores), key=lambda lr: scores[lr])


MAX_EXTEND = 4  # edge extensions per side: every arm was still improving at 5e-4, lora-da still at 5e-3


def _neighbour(lr: float, up: bool) -> Optional[float]:
    index = min(range(len(LADDER)), key=lambda i: abs(math.log(LADDER[i] / lr)))
    index += 1 if up else -1
    return LADDER[index] if 0 <= index < len(LADDER) else None


def arm_lrs(out: str, arm: str, base: List[float], max_extend: int) -> Tuple[List[float], bool]:
    """The seed-0 LRs of ``arm`` (the grid plus edge extensions known so far) and whether they are final."""
    lrs = sorted(base)
    for _ in range(2 * max_extend + 1):
        best = best_lr(out, arm, lrs)
        if best is None:
            return lrs, False
        low, high = lrs[0], lrs[-1]
        step = None
        if best == high and len([x for x in lrs if x > max(base)]) < max_extend:
            step = _neighbour(high, True)
        elif best == low and len([x for x in lrs if x < min(base)]) < max_extend:
            step = _neighbour(low, False)
        if step is None or step in lrs:
            return lrs, True
        lrs = sorted(lrs + [step])
    return lrs, True


def plan(args) -> Tuple[List[Run], List[str]]:
    """All runs known so far in priority order, and notes on what is not yet known."""
    arms = [a for a in args.arms.split(",") if a]
    base = sorted({float(x) for x in args.lrs.split(",")} | {args.first_lr})
    runs: List[Run] = [(arm, args.first_lr, 0) for arm in arms]
    others = [lr for lr in base if lr != args.first_lr]
    runs += [(arm, lr, 0) for arm in arms for lr in others]
    notes: List[str] = []
    final_lrs: Dict[str, Optional[List[float]]] = {}
    for arm in arms:
        lrs, final = arm_lrs(args.out, arm, base, args.max_extend)
        runs += [(arm, lr, 0) for lr in lrs if (arm, lr, 0) not in runs]
        final_lrs[arm] = lrs if final else None
        if not final:
            notes.append(f"{arm}: LR range not final until its seed-0 runs at {lrs} are done")
    extra = [int(s) for s in args.extra_seeds.split(",") if s]
    wanted = [a for a in args.extra_seeds_for.split(",") if a in arms]
    variants = [v for v in VARIANTS if v in arms]
    if variants:
        scores = {}
        for v in variants:
            lrs = final_lrs.get(v)
            best = best_lr(args.out, v, lrs) if lrs else None
            scores[v] = pick_loss(read_result(args.out, (v, best, 0))) if best is not None else None
        if all(s is not None for s in scores.values()):
            wanted.append(min(variants, key=lambda v: scores[v]))
        else:
            notes.append("best LoRA-DA variant not yet known (its extra seeds wait)")
    for arm in dict.fromkeys(wanted):
        lrs = final_lrs.get(arm)
        best = best_lr(args.out, arm, lrs) if lrs else None
        if best is None:
            notes.append(f"{arm}: extra seeds {extra} wait for its best LR")
            continue
        runs += [(arm, best, s) for s in extra if (arm, best, s) not in runs]
    return runs, notes


def main() -> int:
    argv = sys.argv[1:]
    passthrough: List[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, passthrough = argv[:cut], argv[cut + 1:]
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench/results/convergence_runs_published/")
    p.add_argument("--arms", default=DEFAULT_ARMS)
    p.add_argument("--first-lr", type=float, default=2e-4)
    p.add_argument("--lrs", default="1e-4,2e-4,5e-4")
    p.add_argument("--max-extend", type=int, default=MAX_EXTEND, help="edge extensions per side and arm")
    p.add_argument("--extra-seeds-for", default="lora,lora-da")
    p.add_argument("--extra-seeds", default="1")
    p.add_argument("--max-runs", type=int, default=None, help="stop after this many runs")
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    logs = os.path.join(args.out, "logs")
    os.makedirs(logs, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    checkout = os.path.join(REPO, "python")
    if glob.glob(os.path.join(checkout, "lora_da", "_core*.so")):  # a built development tree: study this checkout
        env["PYTHONPATH"] = os.pathsep.join([checkout] + [x for x in [os.environ.get("PYTHONPATH")] if x])
        log(f"runs import lora_da from {checkout}")
    else:
        log("runs import the installed lora_da (this checkout's python/lora_da has no built _core)")
    failures: List[Run] = []
    done_here = 0
    start = time.time()
    while True:
        runs, notes = plan(args)
        missing = [r for r in runs if read_result(args.out, r) is None and r not in failures]
        log(f"{len(runs)} runs known, {len(runs) - len(missing) - len(failures)} done, {len(missing)} missing"
            + (f", {len(failures)} failed" if failures else ""))
        if args.dry_run:
            for r in runs:
                state = "done" if read_result(args.out, r) else "MISSING"
                print(f"  {state:8s} {run_name(*r)}")
            for note in notes:
                print(f"  not yet known: {note}")
            return 0
        if not missing or (args.max_runs is not None and done_here >= args.max_runs):
            break
        arm, lr, seed = missing[0]
        name = run_name(arm, lr, seed)
        cmd = [sys.executable, os.path.join(HERE, "study_run.py"), "--arm", arm, "--lr", repr(lr), "--seed", str(seed),
               "--out", args.out, "--threads", "1", *passthrough]
        began = time.time()
        log(f"starting {name}")
        with open(os.path.join(logs, name + ".log"), "a") as handle:
            handle.write(f"# {' '.join(cmd)}\n")
            handle.flush()
            code = subprocess.call(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env)
        minutes = (time.time() - began) / 60
        done_here += 1
        if code or read_result(args.out, missing[0]) is None:
            failures.append(missing[0])
            log(f"FAILED {name} (exit {code}, {minutes:.1f} min; see {logs}/{name}.log)")
        else:
            log(f"done {name} ({minutes:.1f} min)")
    log(f"stopped after {(time.time() - start) / 60:.1f} min; failures: {[run_name(*r) for r in failures] or 'none'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
