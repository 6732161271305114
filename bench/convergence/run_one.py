"""One convergence run of issue #8: SmolLM2-135M + LoRA (r=8, alpha=16) on GSM8K-style problems.

    python bench/convergence/run_one.py --method lora-da --lr 5e-4 --seed 0 --steps 100 \
        --out bench/results/convergence_runs/

Writes ``{out}/{method}_lr{lr}_s{seed}.json`` (skipped when it exists). ``--seed``
governs the training data order and, for ``lora``, PEFT's Kaiming init of ``lora_A``.

* ``lora``: plain ``peft.get_peft_model`` (PEFT's default init), no lora_da.
* every other method: ``lora_da.initialize(model, calibration, rank=8, method=...)`` on
  the first ``--calib-n`` train samples (same tokenization), computed once and cached as an
  adapter directory (``LoraInit.save_pretrained``) under ``{out}/cache/``; every run then
  loads it with ``lora_da.peft_glue.load_init_adapter`` onto a fresh base model, which
  applies the base-weight offset ``W - s*B*A`` of pissa / milora / lora-ga.
* AdamW (weight decay 0), constant LR, grad-norm clip 1.0, batch 4 x <=96 tokens, loss on
  assistant tokens only. Held-out answer-token loss every ``--eval-every`` steps on a fixed
  subset, at the end on the whole held-out set, then greedy exact match.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    IGNORE_INDEX,
    TARGET_MODULES,
    collate,
    encode,
    file_lock,
    greedy_answers,
    load_data,
    run_name,
    truncation_summary,
    write_json_atomic,
)

METHODS = ["lora", "lora-da", "pissa", "milora", "lora-ga", "lora-one", "cntlora", "fisher-subspace"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--lr", type=float, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--out", default="bench/results/convergence_runs/")
    p.add_argument("--cache-dir", default=None, help="init cache (default: OUT/cache)")
    p.add_argument("--data-dir", default=None, help="generated data cache (default: OUT/data)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-len", type=int, default=96)
    p.add_argument("--min-prompt-tokens", type=int, default=40,
                   help="a too-long sample keeps at least this many prompt tokens (question tail + assistant header)")
    p.add_argument("--train-n", type=int, default=2000)
    p.add_argument("--train-seed", type=int, default=0, help="reasoning-gym seed of the train set")
    p.add_argument("--heldout-n", type=int, default=200)
    p.add_argument("--heldout-seed", type=int, default=1, help="reasoning-gym seed of the held-out set")
    p.add_argument("--calib-n", type=int, default=64, help="calibration samples: the first CALIB_N train samples")
    p.add_argument("--calib-batch", type=int, default=8)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--eval-subset", type=int, default=16, help="held-out samples of the loss curve (the first ones)")
    p.add_argument("--final-eval-n", type=int, default=None, help="held-out samples of the final loss (default: all)")
    p.add_argument("--em-n", type=int, default=32, help="held-out prompts of the exact-match test (the first ones)")
    p.add_argument("--max-new-tokens", type=int, default=160)
    p.add_argument("--gen-batch", type=int, default=16)
    p.add_argument("--eval-batch", type=int, default=8)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--force", action="store_true", help="rerun even when the JSON exists")
    return p.parse_args(argv)


def lora_da_fingerprint() -> dict:
    """Where lora_da was imported from and a hash of its Python sources (the library may change during a grid)."""
    import hashlib

    import lora_da

    folder = os.path.dirname(lora_da.__file__)
    digest = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        if name.endswith(".py"):
            with open(os.path.join(folder, name), "rb") as handle:
                digest.update(name.encode() + handle.read())
    return {"path": folder, "sources_sha256": digest.hexdigest()[:16]}


def log(*parts) -> None:
    print(time.strftime("%H:%M:%S"), *parts, flush=True)


def load_base(model_dir: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config.use_cache = False
    return model


def init_key(args) -> str:
    return (f"{args.method}_r{args.rank}_a{args.lora_alpha:g}_cal{args.calib_n}_L{args.max_len}"
            f"_mp{args.min_prompt_tokens}_N{args.train_n}_ts{args.train_seed}")


def cached_init(args, model_dir: str, train_samples, pad_id: int) -> tuple[str, dict]:
    """The adapter dir of this method's init (computed and saved on first use) and its metadata."""
    import lora_da

    folder = os.path.join(args.cache_dir, init_key(args))
    meta_path = os.path.join(folder, "init_meta.json")
    with file_lock(folder + ".lock"):
        if not os.path.exists(meta_path):
            log(f"computing the {args.method} init on {args.calib_n} calibration samples")
            model = load_base(model_dir)
            calib = train_samples[: args.calib_n]
            loader = [collate(calib[i: i + args.calib_batch], pad_id) for i in range(0, len(calib), args.calib_batch)]
            needs_data = args.method not in ("pissa", "milora")
            start = time.perf_counter()
            init = lora_da.initialize(
                model,
                loader if needs_data else None,
                rank=args.rank,
                method=args.method,
                target_modules=TARGET_MODULES,
                train_size=args.train_n,
                progress=False,
                seed=0,
            )
            seconds = time.perf_counter() - start
            staging = folder + f".tmp{os.getpid()}"
            init.save_pretrained(staging, lora_alpha=args.lora_alpha)
            meta = {
                "method": args.method,
                "init_seconds": seconds,
                "timings": dict(init.timings),
                "num_samples": init.num_samples,
                "num_tokens": init.num_tokens,
                "modules": len(init.modules),
                "ranks": sorted(set(init.ranks.values())),
                "modifies_base_weight": init.modifies_base_weight,
                "computed_at": time.strftime("%Y-%m-%d %H:%M:%S"),
                "torch_threads": torch.get_num_threads(),
                "load_average_at_end": os.getloadavg()[0],
                "lora_da": lora_da_fingerprint(),
            }
            write_json_atomic(os.path.join(staging, "init_meta.json"), meta)
            os.replace(staging, folder)
            log(f"{args.method} init: {seconds:.1f} s ({init.summary().splitlines()[2]})")
            meta["cached"] = False
            return folder, meta
    with open(meta_path) as handle:
        meta = json.load(handle)
    meta["cached"] = True
    return folder, meta


@torch.no_grad()
def heldout_loss(model, samples, pad_id: int, batch_size: int) -> float:
    """Mean next-token cross-entropy over every answer token of ``samples``."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(samples), batch_size):
        batch = collate(samples[i: i + batch_size], pad_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        targets = batch["labels"][:, 1:]
        total += float(torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
            ignore_index=IGNORE_INDEX, reduction="sum"))
        count += int((targets != IGNORE_INDEX).sum())
    model.train(was_training)
    return total / count


def exact_match(model, tokenizer, rows, args, eos_id: int, pad_id: int) -> dict:
    """Greedy generation (left padding, full untruncated prompts), answer number vs the reference."""
    results = greedy_answers(model, tokenizer, rows, args.gen_batch, args.max_new_tokens, eos_id, pad_id)
    correct = sum(r["correct"] for r in results)
    return {
        "correct": correct,
        "n": len(results),
        "accuracy": correct / max(len(results), 1),
        "stopped_at_eos": sum(r["stopped_at_eos"] for r in results),
        "median_new_tokens": float(statistics.median(r["new_tokens"] for r in results)) if results else 0.0,
        "examples": results[:3],
        "per_prompt_correct": [r["correct"] for r in results],
    }


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
    name = run_name(args.method, args.lr, args.seed)
    out_path = os.path.join(args.out, name + ".json")
    if os.path.exists(out_path) and not args.force:
        log(f"{out_path} exists: skipped")
        return 0
    wall_start = time.perf_counter()

    from transformers import AutoTokenizer
    from lora_da.demo_assets import smollm2_dir

    model_dir = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    eos_id = int(tokenizer.convert_tokens_to_ids("<|im_end|>"))
    pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id)

    train_rows, heldout_rows, data_info = load_data(
        args.data_dir, args.train_n, args.train_seed, args.heldout_n, args.heldout_seed)
    train = [encode(tokenizer, row, args.max_len, args.min_prompt_tokens) for row in train_rows]
    heldout = [encode(tokenizer, row, args.max_len, args.min_prompt_tokens) for row in heldout_rows]
    final_set = heldout[: args.final_eval_n] if args.final_eval_n else heldout
    curve_set = heldout[: args.eval_subset]
    log(f"{name}: {len(train)} train, {len(heldout)} held-out ({data_info['heldout_dropped_as_in_train']} dropped as in train)")

    torch.manual_seed(args.seed)
    if args.method == "lora":
        from peft import LoraConfig, get_peft_model

        init_meta = {"method": "lora", "init_seconds": None, "cached": False}
        start = time.perf_counter()
        model = get_peft_model(load_base(model_dir), LoraConfig(
            r=args.rank, lora_alpha=args.lora_alpha, lora_dropout=0.0, target_modules=TARGET_MODULES))
        init_meta["peft_wrap_seconds"] = time.perf_counter() - start
        init_meta["init_seconds"] = 0.0
    else:
        from lora_da.peft_glue import load_init_adapter

        folder, init_meta = cached_init(args, model_dir, train, pad_id)
        start = time.perf_counter()
        model = load_init_adapter(load_base(model_dir), folder, is_trainable=True)
        init_meta["load_seconds"] = time.perf_counter() - start
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"trainable parameters: {trainable}")

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    order_gen = torch.Generator().manual_seed(args.seed)
    order: list = []

    curve = []
    eval_seconds = 0.0

    def evaluate(step: int) -> None:
        nonlocal eval_seconds
        t = time.perf_counter()
        loss = heldout_loss(model, curve_set, pad_id, args.eval_batch)
        eval_seconds += time.perf_counter() - t
        curve.append({"step": step, "heldout_loss": loss})
        log(f"step {step:4d} held-out({len(curve_set)}) loss {loss:.4f}")

    evaluate(0)
    model.train()
    train_losses, step_seconds = [], []
    diverged = False
    for step in range(1, args.steps + 1):
        if len(order) < args.batch_size:
            order += torch.randperm(len(train), generator=order_gen).tolist()
        picked, order = order[: args.batch_size], order[args.batch_size:]
        batch = collate([train[i] for i in picked], pad_id)
        t = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        if args.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_seconds.append(time.perf_counter() - t)
        train_losses.append(loss.item())
        if not math.isfinite(train_losses[-1]):
            diverged = True
            log(f"step {step}: loss is {train_losses[-1]}; stopping")
            break
        if step % args.eval_every == 0 or step == args.steps:
            recent = train_losses[-args.eval_every:]
            log(f"step {step:4d} train loss {sum(recent) / len(recent):.4f} ({statistics.median(step_seconds[-args.eval_every:]):.2f} s/step)")
            evaluate(step)
    train_seconds = sum(step_seconds)

    t = time.perf_counter()
    final_loss = heldout_loss(model, final_set, pad_id, args.eval_batch) if not diverged else float("nan")
    final_eval_seconds = time.perf_counter() - t
    log(f"final held-out({len(final_set)}) loss {final_loss:.4f} ({final_eval_seconds:.1f} s)")
    t = time.perf_counter()
    em = exact_match(model, tokenizer, heldout_rows[: args.em_n], args, eos_id, pad_id) if not diverged else None
    em_seconds = time.perf_counter() - t
    if em:
        log(f"exact match {em['correct']}/{em['n']} ({em_seconds:.1f} s, {em['stopped_at_eos']} stopped at EOS)")

    result = {
        "method": args.method,
        "lr": args.lr,
        "seed": args.seed,
        "steps": args.steps,
        "steps_done": len(train_losses),
        "diverged": diverged,
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "cache_dir", "data_dir", "force")},
        "model": "SmolLM2-135M-Instruct (float32, lora_da.demo_assets.smollm2_dir)",
        "target_modules": TARGET_MODULES,
        "trainable_parameters": trainable,
        "optimizer": "AdamW(weight_decay=0), constant LR, no warmup, grad-norm clip "
                     f"{args.grad_clip}, lora_dropout 0",
        "data": {**data_info, "final_eval_n": len(final_set), "curve_eval_n": len(curve_set), "em_n": args.em_n},
        "truncation_train": truncation_summary(train),
        "truncation_heldout": truncation_summary(heldout),
        "init": init_meta,
        "init_seconds": init_meta.get("init_seconds"),
        "train_seconds": train_seconds,
        "median_step_seconds": float(statistics.median(step_seconds)) if step_seconds else None,
        "eval_curve_seconds": eval_seconds,
        "final_eval_seconds": final_eval_seconds,
        "exact_match_seconds": em_seconds,
        "wall_seconds": time.perf_counter() - wall_start,
        "curve": curve,
        "train_loss": train_losses,
        "final_heldout_loss": final_loss,
        "exact_match": em,
        "env": {"torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
                "host_cpus": os.cpu_count(), "lora_da": lora_da_fingerprint(), "load_average_at_end": os.getloadavg()[0],
                "finished_at": time.strftime("%Y-%m-%d %H:%M:%S")},
    }
    write_json_atomic(out_path, result)
    log(f"wrote {out_path} ({result['wall_seconds']:.0f} s wall)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
