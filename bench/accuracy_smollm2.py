"""SmolLM2-135M: ``initialize()`` against an independent float64 reference, and against the floor.

    python bench/accuracy_smollm2.py [--samples 32 --length 256] [--skip-floor] [--output FILE]
                                     [--reference-cache FILE.safetensors]

The job of issue 18: the first ``--samples`` GSM8K-style chats packed into
windows of ``--length`` tokens (as ``bench/bench_init_overhead.py --case
smollm2``), batch 4, rank 8 on all 7 projections of all 30 layers (210
modules), the published hyper-parameters (the defaults), ``train_size`` 7473
(GSM8K's training set).

* **floor**: one plain forward+backward over the same batches, every weight
  trainable (``lora_da.cli.bench.plain_pass_seconds``);
* **ours**: ``lora_da.initialize`` with its defaults, per-phase times;
* **reference** (``bench/float64_reference.py``, untimed): Z, y and G accumulated
  in float64 from the float32 model's activations by a separate hooked pass, and
  a dense float64 ``eigh`` of Ω at the same λ. It takes ~8 minutes here; with
  ``--reference-cache`` its answer is saved (safetensors, no pickle) and read back by
  later runs whose inputs match: the token ids, a float64 checksum of every weight,
  the hyper-parameters and the module names are stored beside it and compared.

Prints the largest principal angle of ``lora_A``'s row space to the reference per
module type, the worst module, the modules whose damping was escalated (and
whether the float64 ``Z + λI`` is positive definite), ours / floor and the phase times.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import platform
import sys
import warnings

import torch

import lora_da
from lora_da.cli.bench import plain_pass_seconds

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_init_overhead import smollm2_case  # noqa: E402
from float64_reference import ReferenceModule, float64_statistics, largest_angle_degrees, reference_bases  # noqa: E402
from timing import Timer  # noqa: E402

RANK = 8
TRAIN_SIZE = 7473  # GSM8K's training set


def reference_key(model, loader, names, config) -> str:
    """What the reference depends on, as a digest: token ids, weights, hyper-parameters, modules."""
    digest = hashlib.sha256()
    for batch in loader:
        digest.update(batch["input_ids"].to(torch.int64).numpy().tobytes())
    with torch.no_grad():
        sums = [float(p.to(torch.float64).sum()) for p in model.parameters()]
    facts = {"weights": sums, "names": list(names), "rank": RANK, "train_size": TRAIN_SIZE, "alpha": config.alpha,
             "beta": config.beta, "damping": config.damping}
    digest.update(json.dumps(facts, sort_keys=True).encode())
    return digest.hexdigest()


def load_reference(path: str, key: str):
    """The cached reference at ``path`` when its key matches, else None."""
    from safetensors import safe_open

    if not os.path.exists(path):
        return None
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
        if meta.get("key") != key:
            print(f"reference cache {path}: made for other inputs, recomputing", flush=True)
            return None
        facts = json.loads(meta["modules"])
        return {
            name: ReferenceModule(
                input_basis=f.get_tensor(name) if fact["has_basis"] else None,
                positive_definite=fact["positive_definite"],
                input_factor_min=fact["input_factor_min"],
                input_factor_max=fact["input_factor_max"],
            )
            for name, fact in facts.items()
        }


def save_reference(path: str, key: str, bases) -> None:
    """Write the reference atomically, with the mode the umask gives (``lora_da.atomic_files``)."""
    from safetensors.torch import save_file

    from lora_da.atomic_files import write_atomically

    tensors = {name: b.input_basis.contiguous() for name, b in bases.items() if b.input_basis is not None}
    facts = {name: {"has_basis": b.input_basis is not None, "positive_definite": b.positive_definite,
                    "input_factor_min": b.input_factor_min, "input_factor_max": b.input_factor_max}
             for name, b in bases.items()}
    write_atomically(path, lambda temporary: save_file(tensors, temporary, metadata={"key": key, "modules": json.dumps(facts)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--skip-floor", action="store_true", help="do not time the plain forward+backward pass")
    parser.add_argument("--precision", default="auto", help="statistics_precision of the run compared (default: auto)")
    parser.add_argument("--also", nargs="*", default=[], metavar="PRECISION",
                        help="more statistics_precision values to time and compare, e.g. float32")
    parser.add_argument("--output")
    parser.add_argument("--reference-cache", metavar="FILE", help="save the float64 reference here, or read it back")
    args = parser.parse_args()

    model, loader, what = smollm2_case(args.samples, args.length)
    num_tokens = sum(int(b["input_ids"].numel()) for b in loader)
    print(f"{what}: {len(loader)} batches, {num_tokens} tokens; rank {RANK}; N {TRAIN_SIZE}", flush=True)

    floor = float("nan")
    if not args.skip_floor:
        plain_pass_seconds(model, loader[:1])  # warm-up
        floor = plain_pass_seconds(model, loader)
        print(f"floor: {floor:.2f} s", flush=True)

    config = lora_da.LoraDAConfig(rank=RANK, train_size=TRAIN_SIZE, progress=False)
    runs = {}  # precision -> (lora_Aᵀ and damping per module, timings, backends, statistics MiB, warnings)
    for precision in [args.precision] + [p for p in args.also if p != args.precision]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            init = lora_da.initialize(
                model, loader, rank=RANK, train_size=TRAIN_SIZE, statistics_precision=precision, progress=False
            )
        print(f"ours ({precision}): {init.timings}", flush=True)
        runs[precision] = (
            {name: (m.lora_A.detach().T.clone(), float(m.damping)) for name, m in init.modules.items()},
            dict(init.timings), dict(init.backends), init.statistics_bytes / 2**20,
            sorted({str(w.message) for w in caught}),
        )
        del init
    ours, timings, backends, statistics_mib, messages = runs[args.precision]

    key = reference_key(model, loader, list(ours), config)
    bases = load_reference(args.reference_cache, key) if args.reference_cache else None
    reference_origin = f"read from {os.path.basename(args.reference_cache)}" if bases is not None else ""
    if bases is None:
        with Timer() as reference_time:
            stats = float64_statistics(model, loader, list(ours))
            bases = reference_bases(
                stats, rank=RANK, alpha=config.alpha, beta=config.beta, damping=config.damping, train_size=TRAIN_SIZE
            )
            del stats
        reference_origin = f"{reference_time.seconds:.0f} s, untimed"
        if args.reference_cache:
            save_reference(args.reference_cache, key, bases)
    print(f"reference: {reference_origin}", flush=True)

    def angles_of(answers):
        return {name: largest_angle_degrees(bases[name].input_basis, answers[name][0])
                for name in answers if bases[name].input_basis is not None}

    angles = angles_of(ours)
    worst_kind = collections.defaultdict(lambda: (0.0, ""))
    for name, angle in angles.items():
        kind = name.rsplit(".", 1)[-1]
        if angle >= worst_kind[kind][0]:
            worst_kind[kind] = (angle, name)
    worst_name = max(angles, key=angles.get)
    escalated = [name for name, (_, damping) in ours.items() if damping > config.damping]
    not_pd = [name for name in ours if not bases[name].positive_definite]
    total = timings["total"]

    lines = [
        f"# Accuracy against float64, and cost: {what}",
        "",
        f"`python bench/accuracy_smollm2.py --samples {args.samples} --length {args.length}"
        + (f" --precision {args.precision}" if args.precision != "auto" else "")
        + (f" --also {' '.join(args.also)}" if args.also else "") + "`",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; torch {torch.__version__}. "
        f"{len(ours)} modules, {num_tokens} tokens, batch 4, rank {RANK}, N {TRAIN_SIZE}, published hyper-parameters "
        f"(α {config.alpha:g}, β {config.beta:g}, γ {config.gamma:g}, λ {config.damping:g}); "
        f"statistics_precision `{args.precision}`, statistics `{backends.get('statistics')}`, "
        f"solve `{backends.get('solve')}`, statistics {statistics_mib:.0f} MiB. Reference: Z, y, G in float64 from the "
        f"float32 model's activations, dense float64 eigh of Ω ({reference_origin}).",
        "",
        "| module type | largest angle to the float64 reference (°) | its module |",
        "|---|---|---|",
    ]
    lines += [f"| {kind} | {angle:.2e} | {name} |" for kind, (angle, name) in worst_kind.items()]
    lines += [
        "",
        f"* **worst over all {len(angles)} modules: {angles[worst_name]:.2e}°** ({worst_name}); target ≤ 0.05°",
        f"* modules with escalated damping: {len(escalated)}" + (f" ({', '.join(escalated[:6])}{' …' if len(escalated) > 6 else ''})" if escalated else ""),
        f"* modules whose float64 Z + λI is not positive definite: {len(not_pd)}" + (f" ({', '.join(not_pd[:6])})" if not_pd else ""),
        "",
        "| phase | seconds |",
        "|---|---|",
        f"| floor: plain forward+backward (all weights trainable) | {floor:.2f} |",
    ]
    for key in ("forward_backward", "statistics_accumulate", "factor_prep", "solve", "total"):
        lines.append(f"| ours: {key} | {timings.get(key, float('nan')):.2f} |")
    lines += ["", f"* **ours / floor: {total / floor:.2f}x**; factor prep + solve {timings.get('factor_prep', 0) + timings.get('solve', 0):.2f} s"]
    if len(runs) > 1:
        lines += ["", "| statistics_precision | statistics accumulation (s) | total (s) | / floor | worst angle (°) | escalated modules |",
                  "|---|---|---|---|---|---|"]
        for precision, (answers, times, _, _, _) in runs.items():
            run_angles = angles_of(answers)
            worst = max(run_angles, key=run_angles.get)
            raised = sum(damping > config.damping for _, damping in answers.values())
            lines.append(
                f"| {precision} | {times['statistics_accumulate']:.2f} | {times['total']:.2f} | {times['total'] / floor:.2f}x "
                f"| {run_angles[worst]:.2e} ({worst}) | {raised} |"
            )
    if messages:
        lines += ["", "Warnings:"] + [f"* {m[:300]}" for m in messages]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
