"""One run of the published-recipe convergence study (issue #21).

    python bench/convergence/study_run.py --arm lora-da --lr 2e-4 --seed 0 \
        --out bench/results/convergence_runs_published/

Writes ``{out}/{arm}_lr{lr}_s{seed}.json`` atomically (skipped when it exists).
SmolLM2-135M-Instruct (float32) + rsLoRA (``use_rslora=True``, r=8, lora_alpha=16, s=16/√8)
on all 7 projections; AdamW (weight decay 0), grad-norm clip 1.0, transformers'
``get_cosine_schedule_with_warmup`` with ``ceil(0.03·steps)`` warmup steps; ONE epoch over
the ``--train-n`` training samples in batches of ``--batch-size`` (order from ``--seed``);
loss on the assistant turn (EOS included). Data-aware inits: the first ``--calib-n``
training samples, ``train_size = --train-n`` (:mod:`study_inits`). ``--seed`` sets the
data order and, for ``lora``, PEFT's Kaiming init of ``lora_A``.

Measured: the training loss per step; the ``pick`` split's loss at ``--curve-points``
evenly spaced steps (the first ``--curve-n`` pick samples) and on the whole pick split at
the end (the LR choice reads it); per-sample token-loss sums and counts on the ``report``
split (paired bootstrap); greedy exact match per prompt on the ``em`` split (McNemar,
Wilson); the energy ratio of every module's ``lora_A`` at init and at the end
(:func:`study_inits.energy_ratio`), per module type; times; the library fingerprint.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import resource
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import IGNORE_INDEX, TARGET_MODULES, collate, greedy_answers, run_name, write_json_atomic  # noqa: E402
import study_data  # noqa: E402
import study_inits  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arm", required=True, choices=study_inits.ARMS)
    p.add_argument("--lr", type=float, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/results/convergence_runs_published/")
    p.add_argument("--cache-dir", default=None, help="init cache (default: OUT/cache)")
    p.add_argument("--data-dir", default=None, help="data cache (default: OUT/data)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--train-n", type=int, default=192, help="N: training samples, one epoch; also train_size")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-steps", type=int, default=None, help="stop early (smoke tests); the schedule keeps N/B steps")
    p.add_argument("--max-len", type=int, default=256, help="longer samples are dropped, never cut")
    p.add_argument("--train-seed", type=int, default=0)
    p.add_argument("--heldout-seed", type=int, default=1)
    p.add_argument("--calib-n", type=int, default=256)
    p.add_argument("--calib-batch", type=int, default=8)
    p.add_argument("--pick-n", type=int, default=32)
    p.add_argument("--report-n", type=int, default=96)
    p.add_argument("--em-n", type=int, default=128)
    p.add_argument("--curve-points", type=int, default=3, help="pick-loss evaluations, step 0 and the end included")
    p.add_argument("--curve-n", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=192, help="the longest training answer is 168 tokens")
    p.add_argument("--gen-batch", type=int, default=32)
    p.add_argument("--eval-batch", type=int, default=16)
    p.add_argument("--warmup-ratio", type=float, default=0.03)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--force", action="store_true")
    return p.parse_args(argv)


def log(*parts) -> None:
    print(time.strftime("%H:%M:%S"), *parts, flush=True)


def cpu_seconds() -> float:
    """User + system CPU seconds of this process (wall time also counts the pauses other jobs impose)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def load_base(model_dir: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config.use_cache = False
    return model


@torch.no_grad()
def sample_losses(model, samples, pad_id: int, batch_size: int) -> list:
    """Per sample ``[sum of next-token cross-entropies over its label tokens, their count]``."""
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(samples), batch_size):
        batch = collate(samples[i: i + batch_size], pad_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        targets = batch["labels"][:, 1:]
        token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX,
                                                  reduction="none")
        valid = targets != IGNORE_INDEX
        out += [[float(s), int(c)] for s, c in zip((token * valid).sum(1), valid.sum(1))]
    model.train(was_training)
    return out


def mean_loss(pairs) -> float:
    """Token-weighted mean: Σ sums / Σ counts."""
    return sum(s for s, _ in pairs) / max(sum(c for _, c in pairs), 1)


def exact_match(model, tokenizer, rows, args, eos_id: int, pad_id: int) -> dict:
    """Greedy generation (left padding, whole prompts): the answer number against the reference."""
    results = greedy_answers(model, tokenizer, rows, args.gen_batch, args.max_new_tokens, eos_id, pad_id)
    correct = sum(r["correct"] for r in results)
    return {
        "correct": correct, "n": len(results), "accuracy": correct / max(len(results), 1),
        "stopped_at_eos": sum(r["stopped_at_eos"] for r in results),
        "with_hash_line": sum("####" in r["text"] for r in results),
        "median_new_tokens": float(statistics.median(r["new_tokens"] for r in results)) if results else 0.0,
        "per_prompt_correct": [bool(r["correct"]) for r in results],
        "per_prompt_predicted": [r["predicted"] for r in results],
    }


def make_model(args, model_dir: str):
    """The PEFT model of the arm (``lora``: PEFT's default init under ``torch.manual_seed(seed)``)."""
    torch.manual_seed(args.seed)
    if args.arm == "lora":
        from peft import LoraConfig, get_peft_model

        return get_peft_model(load_base(model_dir), LoraConfig(
            r=args.rank, lora_alpha=args.lora_alpha, use_rslora=True, lora_dropout=0.0, target_modules=TARGET_MODULES))
    from lora_da.peft_glue import load_init_adapter

    model = load_init_adapter(load_base(model_dir), study_inits.arm_dir(args, args.arm), is_trainable=True)
    scaling = {float(layer.scaling["default"]) for layer in _lora_layers(model)}
    expected = args.lora_alpha / math.sqrt(args.rank)
    if any(abs(s - expected) > 1e-6 for s in scaling):
        raise ValueError(f"loaded adapter scaling {sorted(scaling)} is not rsLoRA's {expected}")
    return model


def _lora_layers(model):
    from lora_da.layers import peft_lora_layers

    return list(peft_lora_layers(model, "default").values())


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    os.makedirs(args.out, exist_ok=True)
    args.cache_dir = args.cache_dir or os.path.join(args.out, "cache")
    args.data_dir = args.data_dir or os.path.join(args.out, "data")
    name = run_name(args.arm, args.lr, args.seed)
    out_path = os.path.join(args.out, name + ".json")
    if os.path.exists(out_path) and not args.force:
        log(f"{out_path} exists: skipped")
        return 0
    wall_start = time.perf_counter()
    cpu_start = cpu_seconds()
    from transformers import AutoTokenizer, get_cosine_schedule_with_warmup
    from lora_da.demo_assets import smollm2_dir

    model_dir = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    eos_id = int(tokenizer.convert_tokens_to_ids("<|im_end|>"))
    pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id)
    sizes = study_data.split_sizes(args)
    sizes["train_n"] = max(args.train_n, args.calib_n)  # the calibration samples are the first train samples
    splits = study_data.load_splits(args.data_dir, tokenizer, eos_id, **sizes)
    study_data.check_disjoint(splits)
    train_all = study_data.encode_rows(tokenizer, splits["train"], eos_id)
    train = train_all[: args.train_n]
    pick = study_data.encode_rows(tokenizer, splits["pick"], eos_id)
    report = study_data.encode_rows(tokenizer, splits["report"], eos_id)
    steps = args.train_n // args.batch_size
    if steps * args.batch_size != args.train_n:
        raise ValueError(f"--train-n {args.train_n} is not a multiple of --batch-size {args.batch_size}")
    warmup = math.ceil(args.warmup_ratio * steps)
    log(f"{name}: N={len(train)}, batch {args.batch_size}, {steps} steps ({warmup} warmup), "
        f"pick {len(pick)}, report {len(report)}, em {len(splits['em'])}; {splits['info']}")

    init_start = time.perf_counter()
    if args.arm != "lora":
        study_inits.ensure_inits(args, lambda: load_base(model_dir), train_all, pad_id, log)
    init_prepare_seconds = time.perf_counter() - init_start
    start = time.perf_counter()
    model = make_model(args, model_dir)
    load_seconds = time.perf_counter() - start
    input_factors = study_inits.load_input_factors(args) if os.path.exists(study_inits.z_path(args)) else None
    energy_init = study_inits.energy_by_type(model, input_factors) if input_factors else None
    norms_init = study_inits.lora_a_norms(model)
    log(f"init ready ({init_prepare_seconds:.0f} s preparing, {load_seconds:.1f} s loading); energy {energy_init}")

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, warmup, steps)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed)).tolist()
    run_steps = min(steps, args.max_steps or steps)
    curve_steps = sorted({round(k * run_steps / max(args.curve_points - 1, 1)) for k in range(args.curve_points)})
    curve, eval_seconds = [], 0.0
    curve_set = pick[: args.curve_n]

    def evaluate(step: int) -> None:
        nonlocal eval_seconds
        t = time.perf_counter()
        loss = mean_loss(sample_losses(model, curve_set, pad_id, args.eval_batch))
        eval_seconds += time.perf_counter() - t
        curve.append({"step": step, "pick_loss": loss})
        log(f"step {step:4d} pick({len(curve_set)}) loss {loss:.4f}")

    if 0 in curve_steps:
        evaluate(0)
    model.train()
    train_losses, step_seconds, lrs, grad_norms, step_cpu = [], [], [], [], []
    diverged = False
    for step in range(1, run_steps + 1):
        batch = collate([train[i] for i in order[(step - 1) * args.batch_size: step * args.batch_size]], pad_id)
        t, c = time.perf_counter(), cpu_seconds()
        loss = model(**batch).loss
        loss.backward()
        grad_norms.append(float(torch.nn.utils.clip_grad_norm_(params, args.grad_clip)))
        lrs.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        step_seconds.append(time.perf_counter() - t)
        step_cpu.append(cpu_seconds() - c)
        train_losses.append(loss.item())
        if not math.isfinite(train_losses[-1]):
            diverged = True
            log(f"step {step}: loss {train_losses[-1]}; stopping")
            break
        log(f"step {step:4d} train loss {train_losses[-1]:.4f} lr {lrs[-1]:.3g} ({step_seconds[-1]:.1f} s)")
        if step in curve_steps and step != run_steps:
            evaluate(step)
    train_seconds = sum(step_seconds)

    t = time.perf_counter()
    pick_pairs = sample_losses(model, pick, pad_id, args.eval_batch) if not diverged else None
    curve.append({"step": len(train_losses), "pick_loss": mean_loss(pick_pairs) if pick_pairs else float("nan"),
                  "whole_pick_split": True})
    report_pairs = sample_losses(model, report, pad_id, args.eval_batch) if not diverged else None
    final_eval_seconds = time.perf_counter() - t
    report_loss = mean_loss(report_pairs) if report_pairs else float("nan")
    log(f"final: pick {curve[-1]['pick_loss']:.4f}, report({len(report)}) {report_loss:.4f} ({final_eval_seconds:.0f} s)")
    t = time.perf_counter()
    em = exact_match(model, tokenizer, splits["em"], args, eos_id, pad_id) if not diverged else None
    em_seconds = time.perf_counter() - t
    if em:
        log(f"exact match {em['correct']}/{em['n']} ({em_seconds:.0f} s; {em['stopped_at_eos']} stopped at EOS)")
    energy_final = study_inits.energy_by_type(model, input_factors) if input_factors and not diverged else None

    result = {
        "arm": args.arm, "lr": args.lr, "seed": args.seed,
        "steps": steps, "steps_done": len(train_losses), "warmup_steps": warmup, "diverged": diverged,
        "complete": len(train_losses) == steps and not diverged,
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "cache_dir", "data_dir", "force")},
        "model": "SmolLM2-135M-Instruct (float32, lora_da.demo_assets.smollm2_dir)",
        "recipe": (f"rsLoRA r={args.rank} lora_alpha={args.lora_alpha:g} (s={args.lora_alpha / math.sqrt(args.rank):.3f}) "
                   f"on {','.join(TARGET_MODULES)}; AdamW wd 0; clip {args.grad_clip}; cosine, {warmup} warmup "
                   f"of {steps} steps; one epoch of N={args.train_n}, batch {args.batch_size}"),
        "data": splits["info"],
        "trainable_parameters": sum(p.numel() for p in params),
        "init": study_inits.read_meta(args, args.arm) if args.arm != "lora" else {"arm": "lora", "init_seconds": 0.0},
        "init_prepare_seconds": init_prepare_seconds, "load_seconds": load_seconds,
        "train_seconds": train_seconds,
        "median_step_seconds": float(statistics.median(step_seconds)) if step_seconds else None,
        "curve_eval_seconds": eval_seconds, "final_eval_seconds": final_eval_seconds, "exact_match_seconds": em_seconds,
        "wall_seconds": time.perf_counter() - wall_start,
        "cpu_seconds": cpu_seconds() - cpu_start,
        "train_cpu_seconds": sum(step_cpu),
        "median_step_cpu_seconds": float(statistics.median(step_cpu)) if step_cpu else None,
        "train_loss": train_losses, "lr_schedule": lrs, "grad_norm_before_clip": grad_norms,
        "curve": curve,
        "pick_loss": curve[-1]["pick_loss"],
        "report_loss": report_loss,
        "report_sample_losses": report_pairs,
        "exact_match": em,
        "energy_ratio_init": energy_init, "energy_ratio_final": energy_final,
        "lora_A_norm_init": norms_init, "lora_A_norm_final": study_inits.lora_a_norms(model),
        "energy_definition": "[tr(A Z A^T)/tr(A A^T)] / [tr(Z)/d_in], Z = raw input factor of the 256 calibration "
                             "samples (attention mask), A = the layer's lora_A; 1 = a random unit direction",
        "env": {"torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
                "host_cpus": os.cpu_count(), "lora_da": study_inits.lora_da_fingerprint(),
                "load_average_at_end": os.getloadavg()[0], "nice": os.nice(0),
                "finished_at": time.strftime("%Y-%m-%d %H:%M:%S")},
    }
    write_json_atomic(out_path, result)
    log(f"wrote {out_path} ({result['wall_seconds']:.0f} s wall)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
