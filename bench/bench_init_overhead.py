"""Init overhead: lora-da's ``initialize()`` against the published algorithm and the floor.

    python bench/bench_init_overhead.py --case tiny
    python bench/bench_init_overhead.py --case smollm2 [--samples 32 --length 256] [--output FILE]
    python bench/bench_init_overhead.py --case llama7b-shaped --layers 2 --samples 256 --length 1024
        (GPU: random weights, hidden 4096, intermediate 11008, bf16; --hidden/--intermediate/
        --heads/--vocab/--device shrink it, e.g. to check the script on a CPU)

One process, one run, same model, data and hyper-parameters for all three:

* **floor** — one plain forward+backward pass over the data (HF loss,
  ``.backward()``, every parameter trainable, no hooks);
* **ours** — ``lora_da.initialize(model, loader, r)`` with its defaults
  (per-phase times from ``result.timings``);
* **baseline** — ``bench/published_baseline.py``: the published recipe
  (separate gradient pass, one more pass per 8 layers, fp32 addmm on
  boolean-gathered rows, explicit Z⁻¹, ``torch.lobpcg(niter=10)`` per module).

Compilation is not timed: before the timed runs, ``initialize()`` and the
baseline each run once on the first ``--warmup-batches`` batches (same batch
shape, so the same kernels, autotune keys and solver shapes): Triton's compile
and autotune, the first loading of cuBLAS/cuSOLVER and the allocator's first growth land
there. The warm-up's own time is reported on its own row, with the compile time
it implies (warm-up statistics accumulation minus the timed run's per-batch share).

Then, untimed: both answers against the dense ``eigh`` oracle on their own
statistics (largest principal angle per module type), and ours against the
baseline's (``--skip-oracle`` leaves this out). The timing table is printed
before the oracle runs.
"""

from __future__ import annotations

import argparse
import collections
import platform
import sys
import warnings
from typing import Dict, List, Tuple

import torch

import lora_da
from lora_da import pipeline
from lora_da.methods.lora_da import solve_modules
from lora_da.cli.bench import plain_pass_seconds
from lora_da.models import batches

from published_baseline import eigh_subspace, largest_angle, module_type, published_initialize
from timing import Timer

RANK = 8


def smollm2_case(num_samples: int, length: int) -> Tuple[torch.nn.Module, List[dict], str]:
    """SmolLM2-135M-Instruct and ``num_samples`` windows of exactly ``length`` tokens,
    packed from GSM8K-style chats (labels on the answers only)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_da.data import encode_rows
    from lora_da.demo_assets import gsm_rows, smollm2_dir

    directory = smollm2_dir()
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    needed = num_samples * length
    ids: List[torch.Tensor] = []
    labels: List[torch.Tensor] = []
    rows = gsm_rows(4 * num_samples * length // 150 + 8)
    for sample in encode_rows(list(enumerate(rows, 1)), tokenizer, max_length=4096):
        ids.append(sample.input_ids)
        labels.append(sample.labels)
        if sum(t.numel() for t in ids) >= needed:
            break
    stream_ids, stream_labels = torch.cat(ids)[:needed], torch.cat(labels)[:needed]
    samples = [
        {"input_ids": i, "labels": lab}
        for i, lab in zip(stream_ids.view(num_samples, length), stream_labels.view(num_samples, length))
    ]
    return model, list(batches(samples, 4)), f"SmolLM2-135M-Instruct, {num_samples} x {length} tokens (GSM chats packed)"


def tiny_case() -> Tuple[torch.nn.Module, List[dict], str]:
    from lora_da.models import synthetic_samples, tiny_llama

    model = tiny_llama(hidden_size=64, intermediate_size=128, num_layers=4)
    return model, list(batches(synthetic_samples(64, max_len=32), 8)), "tiny Llama (4 layers, hidden 64), 64 samples"


def llama7b_shaped_case(
    num_layers: int, num_samples: int, length: int, *, device: str = "cuda", hidden: int = 4096,
    intermediate: int = 11008, heads: int = 32, vocab: int = 32000, batch_size: int = 4,
) -> Tuple[torch.nn.Module, List[dict], str]:
    """Random weights with Llama-2-7B's layer shapes (hidden 4096, intermediate 11008), bf16,
    made directly on ``device`` (no fp32 copy on the host)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=num_layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=max(4096, length),
    )
    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default_dtype)
    generator = torch.Generator().manual_seed(0)
    samples = []
    for _ in range(num_samples):
        ids = torch.randint(3, vocab, (length,), generator=generator)
        samples.append({"input_ids": ids, "labels": ids.clone()})
    shape = "Llama-7B-shaped" if (hidden, intermediate, heads, vocab) == (4096, 11008, 32, 32000) else (
        f"Llama-shaped (hidden {hidden}, intermediate {intermediate}, {heads} heads, vocab {vocab})")
    return model, list(batches(samples, batch_size)), f"{shape}, {num_layers} layers, bf16, {num_samples} x {length}"


class _KeepStatistics:
    """Keeps what ``initialize``'s statistics pass returned (for the untimed oracle)."""

    def __init__(self) -> None:
        self.kept = []
        self.original = pipeline.collect_statistics

    def __enter__(self):
        def spy(*args, **kwargs):
            stats = self.original(*args, **kwargs)
            self.kept.append(stats)
            return stats

        pipeline.collect_statistics = spy
        return self

    def __exit__(self, *exc):
        pipeline.collect_statistics = self.original


def warm_up(model, loader: List[dict], train_size: int, with_baseline: bool) -> Dict[str, float]:
    """One untimed-by-the-table run of ``initialize()`` (and of the baseline) on ``loader``:
    compiles and autotunes the kernels for these shapes. Returns its seconds."""
    device = next(model.parameters()).device
    seconds: Dict[str, float] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Timer(device) as timer:
            ours = lora_da.initialize(model, loader, RANK, train_size=train_size, progress=False)
    seconds["ours"] = timer.seconds
    seconds["ours statistics_accumulate"] = ours.timings.get("statistics_accumulate", float("nan"))
    if with_baseline:
        with Timer(device) as timer:
            published_initialize(model, loader, RANK, train_size=train_size)
        seconds["baseline"] = timer.seconds
    return seconds


def oracle_angles(keep: "_KeepStatistics", ours, baseline, train_size: int) -> Dict[str, Dict[str, float]]:
    """Largest principal angle per module type: ours and the baseline against ``eigh``."""
    worst: Dict[str, Dict[str, float]] = collections.defaultdict(lambda: collections.defaultdict(float))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = lora_da.LoraDAConfig(rank=RANK, solver="eigh", progress=False)
        oracle = {}
        for stats in keep.kept:
            oracle.update(solve_modules(stats, config, train_size)[0])
    for name, exact in oracle.items():
        kind = module_type(name)
        worst[kind]["ours vs eigh"] = max(worst[kind]["ours vs eigh"], largest_angle(ours.modules[name].lora_A.T, exact.lora_A.T))
        if baseline is not None:
            reference = eigh_subspace(baseline.guidance[name], RANK)
            angle = largest_angle(baseline.lora_A[name].T, reference)
            worst[kind]["baseline vs eigh"] = max(worst[kind]["baseline vs eigh"], angle)
            worst[kind]["baseline's eigh vs ours"] = max(
                worst[kind]["baseline's eigh vs ours"], largest_angle(reference, ours.modules[name].lora_A.T)
            )
    return worst


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=["tiny", "smollm2", "llama7b-shaped"], default="tiny")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4, help="llama7b-shaped: number of layers")
    parser.add_argument("--hidden", type=int, default=4096, help="llama7b-shaped: hidden size")
    parser.add_argument("--intermediate", type=int, default=11008, help="llama7b-shaped: intermediate size")
    parser.add_argument("--heads", type=int, default=32, help="llama7b-shaped: attention heads")
    parser.add_argument("--vocab", type=int, default=32000, help="llama7b-shaped: vocabulary size")
    parser.add_argument("--batch-size", type=int, default=4, help="llama7b-shaped: samples per batch")
    parser.add_argument("--device", default=None, help="llama7b-shaped: where the model lives (default: cuda if present)")
    parser.add_argument("--warmup-batches", type=int, default=1,
                        help="batches of the untimed warm-up run of each method (0: none; compile time then lands in the table)")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--skip-oracle", action="store_true", help="leave out the untimed eigh agreement")
    parser.add_argument("--output")
    args = parser.parse_args(argv)

    if args.case == "tiny":
        model, loader, what = tiny_case()
    elif args.case == "smollm2":
        model, loader, what = smollm2_case(args.samples, args.length)
    else:
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        model, loader, what = llama7b_shaped_case(
            args.layers, args.samples, args.length, device=device, hidden=args.hidden,
            intermediate=args.intermediate, heads=args.heads, vocab=args.vocab, batch_size=args.batch_size,
        )
    device = next(model.parameters()).device
    if device.type != "cpu":
        loader = [{k: v.to(device) for k, v in b.items()} for b in loader]
    num_tokens = sum(int(b["input_ids"].numel()) for b in loader)
    train_size = 1000
    print(f"{what}: {len(loader)} batches, {num_tokens} tokens; rank {RANK}; device {device}", flush=True)

    plain_pass_seconds(model, loader[:1])  # warm-up (allocator, kernels)
    floor = plain_pass_seconds(model, loader)
    print(f"floor: {floor:.2f} s", flush=True)

    warm = {}
    if args.warmup_batches > 0:
        warm = warm_up(model, loader[: args.warmup_batches], train_size, with_baseline=not args.skip_baseline)
        print(f"warm-up on {min(args.warmup_batches, len(loader))} batch(es): {warm}", flush=True)

    with _KeepStatistics() as keep, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = lora_da.initialize(model, loader, RANK, train_size=train_size, progress=False)
    print(f"ours: {ours.timings}", flush=True)

    baseline = None
    if not args.skip_baseline:
        baseline = published_initialize(model, loader, RANK, train_size=train_size)
        print(f"baseline: {baseline.timings} ({baseline.passes} factor passes)", flush=True)

    ours_total = ours.timings["total"]
    lines = [
        f"# Init overhead: {what}",
        "",
        "`python bench/bench_init_overhead.py " + " ".join(sys.argv[1:] if argv is None else argv) + "`",
        "",
        f"Device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads; torch {torch.__version__}; {len(ours.modules)} modules, {num_tokens} tokens, "
        f"rank {RANK}; ours: statistics `{ours.backends.get('statistics')}`, solve `{ours.backends.get('solve')}`, "
        f"{ours.passes} pass(es), statistics peak {ours.statistics_bytes / 2**20:.0f} MiB.",
        "",
        "| phase | floor (s) | ours (s) | baseline (s) |",
        "|---|---|---|---|",
        f"| plain forward+backward | {floor:.2f} | | |",
    ]
    ours_rows = [("forward+backward", "forward_backward"), ("statistics accumulation", "statistics_accumulate"),
                 ("factor prep", "factor_prep"), ("solve", "solve")]
    for label, key in ours_rows:
        lines.append(f"| ours: {label} | | {ours.timings.get(key, float('nan')):.2f} | |")
    if baseline is not None:
        for phase, seconds in baseline.timings.items():
            if phase != "total":
                lines.append(f"| baseline: {phase} | | | {seconds:.2f} |")
    lines.append(
        f"| **total** | **{floor:.2f}** | **{ours_total:.2f}** | "
        + (f"**{baseline.timings['total']:.2f}** |" if baseline is not None else "|")
    )
    if warm:
        batches_warm = min(args.warmup_batches, len(loader))
        compile_seconds = warm["ours statistics_accumulate"] - ours.timings.get(
            "statistics_accumulate", float("nan")) * batches_warm / len(loader)
        lines.append(
            f"| warm-up on {batches_warm} batch(es), not in the totals | | {warm['ours']:.2f} | "
            + (f"{warm['baseline']:.2f} |" if "baseline" in warm else "|")
        )
        lines += ["", f"* compile + autotune (warm-up statistics accumulation minus the timed run's share of "
                  f"{batches_warm} batch(es)): ~{max(compile_seconds, 0.0):.2f} s, excluded from the table's phases"]
    else:
        lines += ["", "* no warm-up (`--warmup-batches 0`): first-call compilation is inside the phases"]
    lines += [f"* ours / floor: **{ours_total / floor:.2f}x**"]
    if baseline is not None:
        lines += [
            f"* baseline / ours: **{baseline.timings['total'] / ours_total:.1f}x**",
            f"* baseline / floor: {baseline.timings['total'] / floor:.2f}x",
        ]
    print("\n".join(lines), flush=True)  # the timings, before the (long) oracle
    if args.output:  # written now too, in case the oracle does not finish
        with open(args.output, "w") as f:
            f.write("\n".join(lines) + "\n")

    if not args.skip_oracle:
        worst = oracle_angles(keep, ours, baseline, train_size)
        columns = ["ours vs eigh"] + (["baseline vs eigh", "baseline's eigh vs ours"] if baseline is not None else [])
        angle_lines = ["", "Largest principal angle (radians) per module type:", "",
                       "| module type | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
        for kind, angles in worst.items():
            angle_lines.append(f"| {kind} | " + " | ".join(f"{angles[c]:.1e}" for c in columns) + " |")
        print("\n".join(angle_lines), flush=True)
        lines += angle_lines
    text = "\n".join(lines) + "\n"
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)


if __name__ == "__main__":
    with Timer() as wall:
        main()
    print(f"(benchmark wall time {wall.seconds:.0f} s)")
