"""Summarize the convergence runs: a markdown table and a loss-vs-step figure.

    python bench/convergence/report.py [--runs bench/results/convergence_runs/] \
        [--md bench/results/convergence_smollm2_cpu.md] [--png bench/results/convergence_smollm2_cpu.png]

Reads every ``{method}_lr{lr}_s{seed}.json`` of ``--runs`` with ``--steps`` steps.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import statistics
import sys
from collections import defaultdict

ORDER = ["lora-da", "lora", "pissa", "milora", "lora-ga", "lora-one", "cntlora", "fisher-subspace"]
GRID_COMMAND = ("python bench/convergence/driver.py --workers 2 --lrs 5e-4,1e-4 "
                "--methods lora-da,lora,pissa,lora-ga,lora-one,milora,cntlora,fisher-subspace "
                "--extra-seeds-for lora-da,lora")
SEED_NOISE_FLOOR = 0.005  # final-loss differences below this count as equal even without a second seed


def load_runs(folder: str, steps: int) -> list:
    runs = []
    for path in sorted(glob.glob(os.path.join(folder, "*_lr*_s*.json"))):
        with open(path) as handle:
            run = json.load(handle)
        if run.get("steps") == steps:
            runs.append(run)
    return runs


def curve_at(run: dict, step: int):
    for point in run["curve"]:
        if point["step"] == step:
            return point["heldout_loss"]
    return float("nan")


def spread(values: list) -> str:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "n/a"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.4f}"
    return f"{mean:.4f} ± {(max(values) - min(values)) / 2:.4f}"


def mean(values: list) -> float:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else float("nan")


def method_key(method: str) -> int:
    return ORDER.index(method) if method in ORDER else len(ORDER)


def table(groups: dict) -> list:
    lines = [
        "| method | lr | seed(s) | init s | final held-out loss (all) | loss @0 | loss @50 | loss @100 | exact match | train s | lora-da − method (final loss) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (lr, method) in sorted(groups, key=lambda k: (-k[0], method_key(k[1]))):
        runs = sorted(groups[(lr, method)], key=lambda r: r["seed"])
        seeds = ",".join(str(r["seed"]) for r in runs)
        init_s = mean([r["init_seconds"] for r in runs])
        init_text = "0 (PEFT)" if method == "lora" else f"{init_s:.0f}"
        finals = [r["final_heldout_loss"] for r in runs]
        em = [r["exact_match"] for r in runs if r.get("exact_match")]
        em_text = " / ".join(f"{e['correct']}/{e['n']}" for e in em) if em else "n/a"
        reference = groups.get((lr, "lora-da"))
        if reference and method != "lora-da":
            diff = mean([r["final_heldout_loss"] for r in reference]) - mean(finals)
            diff_text = f"{diff:+.4f}"
        else:
            diff_text = "—"
        diverged = " (diverged)" if any(r.get("diverged") for r in runs) else ""
        lines.append(
            f"| {method}{diverged} | {lr:g} | {seeds} | {init_text} | {spread(finals)} | "
            f"{spread([curve_at(r, 0) for r in runs])} | {spread([curve_at(r, 50) for r in runs])} | "
            f"{spread([curve_at(r, runs[0]['steps']) for r in runs])} | {em_text} | "
            f"{mean([r['train_seconds'] for r in runs]):.0f} | {diff_text} |"
        )
    return lines


def verdicts(groups: dict) -> list:
    """lora-da against each method at each lr: better / equal / worse on the final held-out loss.

    Equal when the difference is within the seeds' spread: twice the larger half-range of the two
    (lora-da's and the method's, where it has two seeds), and at least SEED_NOISE_FLOOR.
    """
    lines = []
    for lr in sorted({lr for lr, _ in groups}, reverse=True):
        reference = groups.get((lr, "lora-da"))
        if not reference:
            continue
        ours = [r["final_heldout_loss"] for r in reference]
        for method in sorted({m for l, m in groups if l == lr and m != "lora-da"}, key=method_key):
            theirs = [r["final_heldout_loss"] for r in groups[(lr, method)]]
            half_ranges = [(max(v) - min(v)) / 2 for v in (ours, theirs) if len(v) > 1]
            margin = max([SEED_NOISE_FLOOR] + [2 * h for h in half_ranges])
            diff = mean(ours) - mean(theirs)
            word = "equal" if abs(diff) <= margin else ("better" if diff < 0 else "worse")
            lines.append(
                f"* lr {lr:g}: lora-da is **{word}** {'to' if word == 'equal' else 'than'} {method}: final loss {mean(ours):.4f} vs {mean(theirs):.4f} "
                f"({diff:+.4f}; equal within ±{margin:.4f})"
            )
    return lines


def figure(groups: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lrs = sorted({lr for lr, _ in groups}, reverse=True)
    fig, axes = plt.subplots(1, len(lrs), figsize=(6.5 * len(lrs), 4.8), squeeze=False)
    colors = {m: plt.get_cmap("tab10")(i) for i, m in enumerate(ORDER)}
    for ax, lr in zip(axes[0], lrs):
        curves = {}
        for method in sorted({m for l, m in groups if l == lr}, key=method_key):
            runs = groups[(lr, method)]
            steps = [p["step"] for p in runs[0]["curve"]]
            matrix = [[curve_at(r, s) for s in steps] for r in runs]
            curves[method] = (steps, matrix, [mean(col) for col in zip(*matrix)])
        # A method far above the others (e.g. an init that breaks the model) would flatten the
        # plot: the y range stops at 1.5x the median step-0 loss and such curves say so in the legend.
        starts = [c[2][0] for c in curves.values() if math.isfinite(c[2][0])]
        ceiling = 1.5 * statistics.median(starts) if starts else float("inf")
        shown = [v for c in curves.values() for v in c[2] if math.isfinite(v) and v <= ceiling]
        for method, (steps, matrix, avg) in curves.items():
            runs = groups[(lr, method)]
            label = method + (f" ({len(runs)} seeds)" if len(runs) > 1 else "")
            if any(math.isfinite(v) and v > ceiling for v in avg):
                label += f" (off scale: {avg[0]:.2f} at step 0, {avg[-1]:.2f} at {steps[-1]})"
            ax.plot(steps, avg, marker="o", ms=3, color=colors.get(method), label=label,
                    lw=2.2 if method == "lora-da" else 1.4)
            if len(runs) > 1:
                ax.fill_between(steps, [min(c) for c in zip(*matrix)], [max(c) for c in zip(*matrix)],
                                color=colors.get(method), alpha=0.2, lw=0)
        if shown:
            low, high = min(shown), max(shown)
            pad = 0.05 * (high - low) if high > low else 0.05
            ax.set_ylim(low - pad, high + pad)
        ax.set_title(f"lr {lr:g}")
        ax.set_xlabel("step (batch 4 x 96 tokens)")
        ax.set_ylabel("held-out answer-token loss (16 samples)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("SmolLM2-135M-Instruct, LoRA r=8, alpha=16, all decoder linears\nGSM8K-style problems (reasoning-gym), CPU", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", default="bench/results/convergence_runs/")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--md", default="bench/results/convergence_smollm2_cpu.md")
    p.add_argument("--png", default="bench/results/convergence_smollm2_cpu.png")
    args = p.parse_args()
    runs = load_runs(args.runs, args.steps)
    if not runs:
        print(f"no {args.steps}-step runs in {args.runs}", file=sys.stderr)
        return 1
    groups = defaultdict(list)
    for run in runs:
        groups[(run["lr"], run["method"])].append(run)
    first = runs[0]
    s, d = first["settings"], first["data"]
    tr = first["truncation_train"]
    ho = first["truncation_heldout"]
    step_times = [r["median_step_seconds"] for r in runs if r.get("median_step_seconds")]
    walls = [r["wall_seconds"] for r in runs]
    lrs = sorted({lr for lr, _ in groups}, reverse=True)
    present = {(r["method"], r["lr"], r["seed"]) for r in runs}
    full_grid = [(m, lr, 0) for lr in (lrs or [5e-4]) for m in ORDER]
    missing = [f"{m} lr {lr:g} s{seed}" for m, lr, seed in full_grid if (m, lr, seed) not in present]

    md = [
        "# Convergence of LoRA initializations — SmolLM2-135M on GSM8K-style problems (CPU), issue #8",
        "",
        f"![held-out loss vs step]({os.path.basename(args.png)})",
        "",
        "Produced by",
        "",
        f"    {GRID_COMMAND}",
        f"    python bench/convergence/report.py",
        "",
        f"({len(runs)} runs of {args.steps} steps; JSON per run and logs in `{args.runs.rstrip('/')}/`.)",
        "",
        "## Settings",
        "",
        f"* Model: {first['model']}; LoRA r={s['rank']}, lora_alpha={s['lora_alpha']:g}, lora_dropout 0, on "
        f"{', '.join(first['target_modules'])} of every decoder block ({first['trainable_parameters']:,} trainable "
        "parameters at r=8; cntlora's per-layer ranks give fewer).",
        f"* Training: {first['optimizer']}; batch {s['batch_size']} x ≤{s['max_len']} tokens; {args.steps} steps "
        f"({args.steps * s['batch_size']} samples, {args.steps * s['batch_size'] / d['train_n']:.0%} of an epoch); "
        "loss on the assistant (answer) tokens only; `--seed` sets the data order and, for lora, PEFT's Kaiming init.",
        "* `lora`: plain `peft.get_peft_model` (Kaiming-uniform A, zero B), no lora_da. Every other method: "
        f"`lora_da.initialize(model, calibration, rank=8, method=..., train_size={d['train_n']})` on the first "
        f"{s['calib_n']} training samples (same tokenization), computed once, saved with `LoraInit.save_pretrained` "
        "and loaded for each run with `lora_da.peft_glue.load_init_adapter` (which applies the base-weight offset "
        "`W − s·B·A` of pissa, milora and lora-ga). Library defaults otherwise (LoRA-DA α=1, β=0.03, γ=1024).",
        "* Measurements: held-out answer-token loss (token-weighted mean cross-entropy) every "
        f"{s['eval_every']} steps on the first {d['curve_eval_n']} held-out samples; final loss at step "
        f"{args.steps} on all {d['final_eval_n']} held-out samples; exact match on the first {d['em_n']} held-out "
        f"prompts (full prompts, not truncated; greedy, batched with left padding, max_new_tokens "
        f"{s['max_new_tokens']}, stop at `<|im_end|>`; the number after the last `####`, else the last number, "
        "against the reference answer). Init s: wall seconds of `lora_da.initialize` when the init was first "
        "computed (cached afterwards); train s: optimizer steps only (no evaluation).",
        "",
        "## Data",
        "",
        f"* reasoning-gym `gsm_symbolic`: {d['train_n']} training problems (seed {d['train_seed']}, "
        f"{d['train_distinct_questions']} distinct questions) and {d['heldout_requested']} held-out problems "
        f"(seed {d['heldout_seed']}); {d['heldout_dropped_as_in_train']} held-out problems whose question also "
        f"appears in the training set were dropped, leaving {d['heldout_n']}.",
        "* Chat rows as `lora_da.demo_assets.gsm_rows`: user = question, assistant = `metadata.answer_cot` "
        "(or `answer`), rendered with SmolLM2's chat template (its default system prompt included).",
        "",
        "## Caveats",
        "",
        f"* **Truncation to {s['max_len']} tokens.** The full samples are longer (train medians: prompt "
        f"{tr['median_full_prompt_tokens']:.0f}, answer {tr['median_full_answer_tokens']:.0f} tokens). A sample over "
        f"{s['max_len']} tokens keeps at least {s['min_prompt_tokens']} prompt tokens from the end (question tail + "
        "assistant header; the system prompt and the question's start are cut), then the answer's end is cut. "
        f"Kept medians: prompt {tr['median_kept_prompt_tokens']:.0f}, answer {tr['median_kept_answer_tokens']:.0f} tokens "
        f"(train; held-out: {ho['median_kept_prompt_tokens']:.0f} / {ho['median_kept_answer_tokens']:.0f}); "
        f"{tr['fraction_truncated']:.0%} of the training samples are truncated, {tr['fraction_answer_cut']:.0%} lose the "
        "end of their answer (usually the `#### N` line). The losses are on these truncated samples; exact match "
        "uses the full prompts, so it tests something the training never showed whole.",
        "* 100 steps of batch 4 is a short run: the differences measure early convergence, not final quality. "
        "Exact match on 32 prompts has a resolution of 3 points.",
        "* CPU timings on a shared 2-core machine (two runs in parallel, one thread each, next to other jobs): "
        f"median step {statistics.median(step_times):.2f} s, run wall {statistics.median(walls) / 60:.1f} min (median); "
        "compare init times between methods only roughly.",
        "* `cntlora` and `fisher-subspace` are this library's readings of their abstracts (see the README), not "
        "the authors' algorithms. cntlora adds its full closed-form ΔW at init (no base offset). Its first reading "
        "(T = D^{1/2}Ĉ^{-1/2}D^{-1/2}) made ‖ΔW‖ ≈ 60‖W‖ on this model (held-out loss 17 at step 0 in a smoke "
        "run); the run here uses the revised reading (the minimal-displacement map, library commit 3262553), "
        "which still gives ‖ΔW‖ ≈ ‖W‖: cntlora starts far from the pre-trained model (see loss @0).",
        "* Library versions: the runs record the imported lora_da's source hash. The inits of pissa, milora, "
        "lora-ga, lora-one and lora-da were computed with commit 44c05b8; cntlora and fisher-subspace with "
        "3262553 (same statistics and method code except cntlora's map; the LoRA-DA solver changes of that "
        "commit are speed-only).",
    ]
    missing += [f"{m} lr {lrs[0]:g} s1" for m in ("lora-da", "lora") if lrs and (m, lrs[0], 1) not in present]
    if len(lrs) == 1:
        missing.append(
            "a second learning rate (the issue asks for two; 1e-4 for lora-da and lora was planned and did not fit "
            "in the session's CPU time: 12 runs of ~25 min on 2 cores)"
        )
    if missing:
        md.append(f"* Reduced grid: missing {', '.join(missing)}.")
    if len(lrs) > 1:
        md.append(f"* At lr {', '.join(f'{lr:g}' for lr in lrs[1:])} every method ran one seed (the second seeds of "
                  f"lora-da and lora at lr {lrs[0]:g} only).")
    md += [
        "",
        "## Results",
        "",
        "Final held-out loss: mean ± half-range over seeds where there are two. Loss @k: the 16-sample curve. "
        "Exact match: correct/prompts per seed. Last column: lora-da's final loss minus the method's at the same "
        "lr (negative = lora-da lower).",
        "",
        *table(groups),
        "",
        "## LoRA-DA against each method",
        "",
        "Final held-out loss (all held-out samples, step 100); \"equal\" = within twice the seeds' half-range "
        f"(at least {SEED_NOISE_FLOOR}).",
        "",
        *verdicts(groups),
        "",
    ]
    with open(args.md, "w") as handle:
        handle.write("\n".join(md))
    figure(groups, args.png)
    print(f"wrote {args.md} and {args.png} ({len(runs)} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
