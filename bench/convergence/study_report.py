"""Report of the published-recipe study (issue #21): markdown + figure, from whatever runs exist.

    python bench/convergence/study_report.py [--runs bench/results/convergence_runs_published/] \
        [--md bench/results/convergence_published_recipe_cpu.md] [--png ...png]

Per arm at its best LR (lowest seed-0 loss on the ``pick`` split): the report-split loss
(mean over seeds, seed spread = max − min), exact match with the Wilson 95% interval
(seed 0), McNemar's exact p against lora (seed 0 vs seed 0, each at its best LR), and the
paired bootstrap 95% interval of the report-loss difference against lora (seed 0 pairs).
A difference is called only when the bootstrap interval excludes 0 AND it exceeds the
larger seed spread of the two arms; without a second seed of both arms it is not called.
Lists the runs the driver still has to do (:func:`study_driver.plan`).
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import TARGET_MODULES, run_name  # noqa: E402
import study_driver  # noqa: E402
from study_stats import mcnemar_exact_p, paired_bootstrap_diff, wilson_interval  # noqa: E402

ORDER = ["lora", "lora-da", "lora-one", "lora-da-lobpcg10", "lora-da-zrel1e-4", "lora-da-zrel1e-2", "pissa"]
MODULE_TYPES = TARGET_MODULES  # the module types of the tables
DRIVER = "nice -n 19 python bench/convergence/study_driver.py --out {out}"


def load(folder: str) -> dict:
    runs = {}
    for path in sorted(glob.glob(os.path.join(folder, "*_lr*_s*.json"))):
        with open(path) as handle:
            run = json.load(handle)
        if "arm" in run:
            runs[(run["arm"], float(run["lr"]), int(run["seed"]))] = run
    return runs


def best_lr(runs: dict, arm: str):
    scores = {lr: (math.inf if r.get("diverged") else r["pick_loss"]) for (a, lr, s), r in runs.items()
              if a == arm and s == 0}
    return min(sorted(scores), key=lambda lr: scores[lr]) if scores else None


def seeds_at(runs: dict, arm: str, lr: float) -> list:
    return [r for (a, l, s), r in sorted(runs.items()) if a == arm and l == lr and not r.get("diverged")]


def fmt(value, digits: int = 4) -> str:
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.{digits}f}"


def arm_summary(runs: dict, arm: str) -> dict:
    lr = best_lr(runs, arm)
    if lr is None:
        return {"arm": arm, "lr": None}
    seeds = seeds_at(runs, arm, lr)
    losses = [r["report_loss"] for r in seeds]
    first = runs.get((arm, lr, 0))
    em = first.get("exact_match") if first else None
    return {
        "arm": arm, "lr": lr, "seeds": [r["seed"] for r in seeds], "run": first,
        "loss_mean": sum(losses) / len(losses) if losses else None,
        "spread": (max(losses) - min(losses)) if len(losses) > 1 else None,
        "em": em, "em_by_seed": [f"{r['exact_match']['correct']}/{r['exact_match']['n']}" for r in seeds if r.get("exact_match")],
        "wilson": wilson_interval(em["correct"], em["n"]) if em else None,
        "lrs_tried": sorted(l for (a, l, s) in runs if a == arm and s == 0),
    }


def compare(summary: dict, base: dict) -> dict:
    """Paired bootstrap of the report loss and McNemar on exact match, seed 0 vs seed 0."""
    out = {"diff": None, "low": None, "high": None, "p": None, "b": None, "c": None, "verdict": "n/a"}
    run, ref = summary.get("run"), base.get("run")
    if not run or not ref or run.get("diverged") or ref.get("diverged"):
        return out
    out["diff"], out["low"], out["high"] = paired_bootstrap_diff(run["report_sample_losses"], ref["report_sample_losses"])
    if run.get("exact_match") and ref.get("exact_match"):
        out["p"], out["b"], out["c"] = mcnemar_exact_p(run["exact_match"]["per_prompt_correct"],
                                                        ref["exact_match"]["per_prompt_correct"])
    excludes_zero = out["low"] > 0 or out["high"] < 0
    if summary.get("spread") is None or base.get("spread") is None:
        out["verdict"] = ("interval excludes 0, seed spread unknown: not called" if excludes_zero
                          else "within the interval")
    elif excludes_zero and abs(out["diff"]) > max(summary["spread"], base["spread"]):
        out["verdict"] = "**lower loss**" if out["diff"] < 0 else "**higher loss**"
    else:
        out["verdict"] = "equal within noise"
    return out


def energy_row(run: dict, key: str) -> str:
    energy = (run or {}).get(key) or {}
    return " | ".join(fmt(energy[t]["mean"], 2) if t in energy else "n/a" for t in MODULE_TYPES)


def missing_runs(folder: str) -> tuple:
    args = SimpleNamespace(out=folder, arms=study_driver.DEFAULT_ARMS, first_lr=2e-4, lrs="1e-4,2e-4,5e-4",
                           max_extend=study_driver.MAX_EXTEND, extra_seeds_for="lora,lora-da", extra_seeds="1")
    planned, notes = study_driver.plan(args)
    return [run_name(*r) for r in planned if study_driver.read_result(folder, r) is None], notes


def plot(runs: dict, summaries: list, png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    for s in summaries:
        if s.get("run"):
            losses = s["run"]["train_loss"]
            smooth = [sum(losses[max(0, i - 3): i + 1]) / len(losses[max(0, i - 3): i + 1]) for i in range(len(losses))]
            axes[0].plot(range(1, len(losses) + 1), smooth, label=f"{s['arm']} (lr {s['lr']:g})")
        points = sorted((l, r["report_loss"]) for (a, l, sd), r in runs.items() if a == s["arm"] and sd == 0
                        and not r.get("diverged"))
        if points:
            axes[1].plot([p[0] for p in points], [p[1] for p in points], marker="o", label=s["arm"])
    axes[0].set(xlabel="step", ylabel="training loss (running mean of 4 steps)", title="training loss at each arm's best LR, seed 0")
    axes[1].set(xscale="log", xlabel="learning rate", ylabel="report-split loss", title="final report loss vs LR (seed 0)")
    done = [s for s in summaries if s.get("em")]
    for i, s in enumerate(done):
        low, high = s["wilson"]
        acc = s["em"]["accuracy"]
        axes[2].errorbar([i], [acc], yerr=[[acc - low], [high - acc]], fmt="o", capsize=4)
    axes[2].set_xticks(range(len(done)), [s["arm"] for s in done], rotation=30, ha="right")
    axes[2].set(ylabel="greedy exact match", title="exact match at the best LR (seed 0), Wilson 95%")
    for ax in axes[:2]:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", default="bench/results/convergence_runs_published/")
    p.add_argument("--md", default="bench/results/convergence_published_recipe_cpu.md")
    p.add_argument("--png", default=None)
    args = p.parse_args(argv)
    png = args.png or os.path.splitext(args.md)[0] + ".png"
    runs = load(args.runs)
    os.makedirs(os.path.dirname(os.path.abspath(args.md)), exist_ok=True)
    summaries = [arm_summary(runs, arm) for arm in ORDER]
    base = summaries[0]
    missing, notes = missing_runs(args.runs)
    any_run = next(iter(runs.values()), None)
    lines = ["# Does LoRA-DA pay off on the published recipe? SmolLM2-135M, GSM8K-style problems (CPU), issue #21", ""]
    if runs:
        plot(runs, summaries, png)
        lines += [f"![training loss, loss vs LR, exact match]({os.path.basename(png)})", ""]
    lines += [("**Status: partial.** " if missing else "**Status: complete.** ")
              + f"{len(runs)} runs done; {len(missing)} of the runs planned so far missing"
              + (": " + ", ".join(missing) if missing else "") + ".", ""]
    lines += [f"* not yet known: {n}" for n in notes] + ([""] if notes else [])
    lines += ["Produced by", "", "    " + DRIVER.format(out=args.runs), "    python bench/convergence/study_report.py", ""]
    if any_run:
        st = any_run["settings"]
        lines += ["## Recipe and departures from the published one", "", f"* {any_run['recipe']}.",
                  f"* **Departure (CPU budget):** one epoch of N = {st['train_n']} samples in batches of "
                  f"{st['batch_size']} = {any_run['steps']} optimizer steps ({any_run['warmup_steps']} warmup; "
                  "transformers' schedule starts the warmup at lr 0), instead of the published 100k samples × "
                  "batch 32 = 3125 steps; the data-aware inits use the first "
                  f"{st['calib_n']} samples of the training pool (train_size = N = {st['train_n']}), of which the "
                  f"run trains the first {st['train_n']}. Samples over {st['max_len']} tokens are dropped, never "
                  "cut (published: < 512 tokens kept, sequence length 1024).",
                  f"* Data: {json.dumps(any_run['data'])}", ""]
    lines += ["## Results at each arm's best LR", "",
              "Report loss: token-weighted mean cross-entropy on the report split (mean over seeds; spread = max − min). "
              "Exact match: seed 0, Wilson 95% interval; per seed in the next column. Δ vs lora: seed-0 report loss "
              "minus lora's (each at its best LR), paired bootstrap 95% interval over samples. McNemar: exact two-sided "
              "p on the exact-match prompts (b = only this arm right, c = only lora right). "
              "(edge): the best LR is the smallest or largest tried, so a better one may lie beyond it.", "",
              "| arm | best LR | LRs tried | seeds | report loss | seed spread | exact match (seed 0) [Wilson 95%] | "
              "EM per seed | Δ loss vs lora [95% CI] | McNemar p (b/c) | verdict |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        if s["lr"] is None:
            lines.append(f"| {s['arm']} | no run yet | | | | | | | | | |")
            continue
        c = compare(s, base) if s["arm"] != "lora" else None
        em = s["em"]
        em_text = f"{em['correct']}/{em['n']} = {em['accuracy']:.3f} [{s['wilson'][0]:.3f}, {s['wilson'][1]:.3f}]" if em else "n/a"
        diff = (f"{c['diff']:+.4f} [{c['low']:+.4f}, {c['high']:+.4f}]" if c and c["diff"] is not None else "—")
        mc = (f"{c['p']:.3g} ({c['b']}/{c['c']})" if c and c["p"] is not None else "—")
        edge = " (edge)" if len(s["lrs_tried"]) > 1 and s["lr"] in (s["lrs_tried"][0], s["lrs_tried"][-1]) else ""
        lines.append(f"| {s['arm']} | {s['lr']:g}{edge} | {', '.join(f'{x:g}' for x in s['lrs_tried'])} | "
                     f"{','.join(map(str, s['seeds']))} | {fmt(s['loss_mean'])} | {fmt(s['spread'])} | {em_text} | "
                     f"{' / '.join(s['em_by_seed'])} | {diff} | {mc} | {c['verdict'] if c else '—'} |")
    by_arm = {s["arm"]: s for s in summaries}
    lines += ["", "## Does LoRA-DA beat LoRA and LoRA-One here?", "",
              "Called only when the paired bootstrap interval of the report-loss difference excludes 0 and the "
              "difference exceeds the larger seed spread of the two arms (each at its best LR); exact match by "
              "McNemar's p < 0.05.", ""]
    for other in ("lora", "lora-one"):
        s, o = by_arm["lora-da"], by_arm[other]
        if s["lr"] is None or o["lr"] is None:
            lines.append(f"* lora-da vs {other}: not yet run.")
            continue
        c = compare(s, o)
        em_text = (f"exact match {s['em']['correct']}/{s['em']['n']} vs {o['em']['correct']}/{o['em']['n']}, McNemar p = "
                   f"{c['p']:.3g}" if c["p"] is not None else "exact match n/a")
        lines.append(f"* lora-da (lr {s['lr']:g}) vs {other} (lr {o['lr']:g}): report loss {fmt(s['loss_mean'])} vs "
                     f"{fmt(o['loss_mean'])}, Δ {c['diff']:+.4f} [{c['low']:+.4f}, {c['high']:+.4f}] → {c['verdict']}; "
                     f"{em_text}" + ("" if not missing else " (partial: best LRs may change as runs land)") + ".")
    same_lr = []
    for variant in ORDER:
        if not variant.startswith("lora-da-"):
            continue
        for (arm, lr, seed), run in sorted(runs.items()):
            ref = runs.get(("lora-da", lr, 0))
            if arm != variant or seed != 0 or ref is None or run.get("diverged") or ref.get("diverged"):
                continue
            diff, low, high = paired_bootstrap_diff(run["report_sample_losses"], ref["report_sample_losses"])
            same_lr.append(f"| {variant} | {lr:g} | {fmt(run['report_loss'])} | {fmt(ref['report_loss'])} | "
                           f"{diff:+.4f} [{low:+.4f}, {high:+.4f}] |")
    if same_lr:
        lines += ["", "## LoRA-DA variants against lora-da at the same LR", "",
                  "Seed 0 of both; report loss; Δ = variant − lora-da with the paired bootstrap 95% interval over "
                  "the report samples.", "", "| variant | LR | variant loss | lora-da loss | Δ [95% CI] |",
                  "|---|---|---|---|---|"] + same_lr
    lines += ["", "## Energy of lora_A (why)", "",
              "Per module type, the mean over layers of [tr(A Z Aᵀ)/tr(A Aᵀ)] / [tr(Z)/d_in]: the activation energy "
              "along A's rows (weighted by their squared norms) relative to a uniformly random unit direction "
              "(1.0); Z = the raw input factor of the 256 calibration samples. At init and after training, seed 0 at "
              "the best LR; ‖A‖: mean Frobenius norm of lora_A at init.", "",
              "| arm | when | " + " | ".join(MODULE_TYPES) + " | ‖A‖_F q_proj / down_proj |",
              "|---|---|" + "---|" * len(MODULE_TYPES) + "---|"]
    for s in summaries:
        run = s.get("run")
        if not run:
            continue
        norms = run.get("lora_A_norm_init") or {}
        lines.append(f"| {s['arm']} | init | {energy_row(run, 'energy_ratio_init')} | "
                     f"{fmt(norms.get('q_proj'), 3)} / {fmt(norms.get('down_proj'), 3)} |")
        lines.append(f"| {s['arm']} | end | {energy_row(run, 'energy_ratio_final')} | |")
    angles_path = os.path.join(args.runs, "init_angles.json")
    if os.path.exists(angles_path):
        with open(angles_path) as handle:
            angles = json.load(handle)
        lines += ["", "## Init subspaces against exact LoRA-DA (why, continued)", "",
                  "Per module type, the largest principal angle (°) between each layer's `lora_A` row space and "
                  f"{angles['reference_arm']}'s (the exact solve), max / median over layers "
                  "(`python bench/convergence/study_init_angles.py`, from the cached inits). Read with the results "
                  "table: arms whose inits are far apart here but whose losses agree say the subspace is not what "
                  "decides the outcome.", "",
                  "| arm | " + " | ".join(MODULE_TYPES) + " |", "|---|" + "---|" * len(MODULE_TYPES)]
        for arm, per_type in angles["arms"].items():
            lines.append(f"| {arm} | " + " | ".join(
                f"{per_type[t]['max']:.3g} / {per_type[t]['median']:.3g}" if t in per_type else "n/a"
                for t in MODULE_TYPES) + " |")
    lines += ["", "## Every run", "", "| run | pick loss | report loss | exact match | steps | init s | train s | "
              "median step s | EM s | wall min | CPU min | lora_da commit |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, r in sorted(runs.items(), key=lambda kv: (ORDER.index(kv[0][0]) if kv[0][0] in ORDER else 99, kv[0][1:])):
        em = r.get("exact_match")
        init = r.get("init") or {}
        lines.append(f"| {run_name(*key)} | {fmt(r['pick_loss'])} | {fmt(r['report_loss'])} | "
                     f"{(str(em['correct']) + '/' + str(em['n'])) if em else 'n/a'} | {r['steps_done']}/{r['steps']} | "
                     f"{fmt(init.get('init_seconds'), 0)} | {r['train_seconds']:.0f} | {fmt(r['median_step_seconds'], 1)} | "
                     f"{r['exact_match_seconds']:.0f} | {r['wall_seconds'] / 60:.1f} | "
                     f"{fmt(r['cpu_seconds'] / 60 if r.get('cpu_seconds') else None, 1)} | "
                     f"{r['env']['lora_da'].get('git_commit', '')[:9]} ({r['env']['lora_da']['sources_sha256']}) |")
    lines += ["", "Times: one thread under `nice -n 19` on a shared 2-core machine; wall seconds include the pauses "
              "other jobs imposed (benchmarks there stop background jobs while they measure), CPU min is the run "
              "process's own CPU time (recorded from commit 997b7df on). Init s: the one-time statistics pass "
              "(wall) plus the arm's solve, shared by the five data-aware arms."]
    tmp = args.md + ".tmp"
    with open(tmp, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    os.replace(tmp, args.md)
    print(f"wrote {args.md}" + (f" and {png}" if runs else "") + f" ({len(runs)} runs, {len(missing)} missing)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
