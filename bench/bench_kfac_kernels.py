"""Benchmark of the Triton K-FAC statistics kernels (needs a CUDA GPU).

Cases (Llama-7B shapes, T = 262144 tokens by default, bf16 activations, 65% of
tokens kept by a 0/1 mask):

* ``Z``: ``input_factor_sum += aᵀ diag(m) a`` for d_in = 4096 and 11008.
* ``full``: the whole update of one module: Z of its input plus y and G of its
  output gradient (d_out = 4096 for both inputs: q_proj-like and down_proj-like).
* ``Z split`` / ``Z 1 split``: ``Z`` for a small d_in (``--split-dims``, default 576,
  SmolLM2's hidden size: 15 upper tiles for 132 SMs) with the default split over tokens
  and with ``num_splits=1``.
* ``Z fp32 ieee`` / ``Z fp32 tf32x3``: ``Z`` of fp32 inputs (d_in = the first of
  ``--dims``) with IEEE fp32 products (the default) and with ``fp32_precision="tf32x3"``.

For each case the table gives the kernel's time and achieved TFLOP/s and the
same work done by

* ``gather+fp32 addmm``: the published approach: boolean-index the valid rows
  (a host sync), upcast to fp32, ``addmm`` (no tensor cores for fp32 without TF32);
* ``bf16 matmul``: a plain ``torch.matmul`` of the masked bf16 operands (the full
  ``d x d`` product, output bf16), added to the fp32 accumulator;
* ``torch reference``: ``lora_da.kernels.kfac_stats`` (fp32 upcast + ``addmm``).

FLOPs: Z counts ``T·d_in²`` (half of the ``2·T·d_in²`` of a full product, since only
the upper triangle is computed), G counts ``2·T·d_out·d_in``. The device's bf16
throughput is measured with a square 8192³ ``torch.matmul`` and with the same-shape
``aᵀa`` product; the kernel's fraction of it is reported. Times: median of a few runs,
``perf_counter`` with a CUDA synchronize at both ends (``bench/timing.py``), after the
first call, whose time (compile and autotune included) is reported apart as "first call s".

Usage: ``python bench/bench_kfac_kernels.py [--tokens N] [--dims 4096 11008] [--save]``;
``--save`` writes ``bench/results/kfac_kernels_<gpu>.json`` and ``.md``.
``--smoke``: tiny shapes, to check that the script runs; without CUDA it runs the
kernels under the Triton interpreter (``TRITON_INTERPRET=1``), and its numbers mean nothing.
The batched Ω kernel has its own script, ``bench/bench_omega_kernel.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import Timer, markdown_table, timed  # noqa: E402

DEVICE = "cuda"  # "cpu" in --smoke runs without a GPU (Triton interpreter)


def device_time(fn, *, warmup: int = 2, repeat: int = 5) -> float:
    """Median seconds of ``fn()`` over ``repeat`` runs (CUDA work waited for)."""
    return timed(fn, warmup=warmup, repeat=repeat, device=DEVICE).median


def measured_bf16_tflops(size: int = 8192) -> float:
    x = torch.randn(size, size, device=DEVICE, dtype=torch.bfloat16)
    y = torch.randn(size, size, device=DEVICE, dtype=torch.bfloat16)
    seconds = device_time(lambda: torch.matmul(x, y), repeat=10)
    return 2 * size**3 / seconds / 1e12


def first_call_seconds(fn) -> float:
    """Seconds of the first ``fn()`` of a shape: Triton's compile and autotune land here."""
    with Timer(DEVICE) as timer:
        fn()
    return timer.seconds


def bench_input_factor(
    tokens: int, d_in: int, kernels, reference, *, case: str = "Z", dtype=torch.bfloat16, **options
) -> dict:
    """``Z`` by the kernel (``options``: its ``fp32_precision`` / ``num_splits``) and the baselines."""
    a = torch.randn(tokens, d_in, device=DEVICE, dtype=dtype)
    mask = torch.rand(tokens, device=DEVICE) < 0.65
    weights = mask.to(torch.float32)
    z = torch.zeros(d_in, d_in, device=DEVICE, dtype=torch.float32)
    flops_half = tokens * d_in * d_in
    flops_full = 2 * tokens * d_in * d_in

    def triton_z():
        kernels.accumulate_input_factor(z, a, weights, **options)

    def gather_fp32_addmm():  # the published approach
        valid = a[mask].float()
        z.addmm_(valid.T, valid)

    a_masked = a * mask.unsqueeze(1).to(a.dtype)

    a_bf16 = a.to(torch.bfloat16)
    a_masked = a_masked.to(torch.bfloat16)

    def bf16_matmul():
        z.add_(torch.matmul(a_masked.T, a_bf16))

    def same_shape_bf16():
        torch.matmul(a_masked.T, a_bf16)

    row = {"case": case, "tokens": tokens, "d_in": d_in, "d_out": None}
    row["first_call_s"] = first_call_seconds(triton_z)
    row["triton_s"] = device_time(triton_z)
    row["gather_fp32_addmm_s"] = device_time(gather_fp32_addmm, warmup=1, repeat=3)
    row["bf16_matmul_s"] = device_time(bf16_matmul)
    row["bf16_same_shape_tflops"] = flops_full / device_time(same_shape_bf16) / 1e12
    row["triton_tflops"] = flops_half / row["triton_s"] / 1e12
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return row


def bench_full_update(tokens: int, d_in: int, d_out: int, kernels, reference) -> dict:
    a = torch.randn(tokens, d_in, device=DEVICE, dtype=torch.bfloat16)
    g = torch.randn(tokens, d_out, device=DEVICE, dtype=torch.bfloat16) * 1e-3
    mask = torch.rand(tokens, device=DEVICE) < 0.65
    weights = mask.to(torch.float32)
    z = torch.zeros(d_in, d_in, device=DEVICE)
    y = torch.zeros(d_out, device=DEVICE)
    grad = torch.zeros(d_out, d_in, device=DEVICE)
    flops = tokens * d_in * d_in + 2 * tokens * d_out * d_in

    def triton_full():
        kernels.accumulate_input_factor(z, a, weights)
        kernels.accumulate_output_statistics(y, grad, g, a, weights)

    def torch_reference():
        reference.accumulate_input_factor(z, a, weights)
        reference.accumulate_output_statistics(y, grad, g, a, weights)

    def gather_fp32_addmm():
        valid_a = a[mask].float()
        valid_g = g[mask].float()
        z.addmm_(valid_a.T, valid_a)
        y.add_((valid_g * valid_g).sum(0))
        grad.addmm_(g.float().T, a.float())  # G is not masked

    def bf16_matmul():
        a_masked = a * mask.unsqueeze(1).to(a.dtype)
        z.add_(torch.matmul(a_masked.T, a))
        y.add_((g.float().square() * weights.unsqueeze(1)).sum(0))
        grad.add_(torch.matmul(g.T, a))

    row = {"case": "full", "tokens": tokens, "d_in": d_in, "d_out": d_out}
    row["first_call_s"] = first_call_seconds(triton_full)
    row["triton_s"] = device_time(triton_full)
    row["gather_fp32_addmm_s"] = device_time(gather_fp32_addmm, warmup=1, repeat=3)
    row["bf16_matmul_s"] = device_time(bf16_matmul)
    row["torch_reference_s"] = device_time(torch_reference, warmup=1, repeat=3)
    row["triton_tflops"] = flops / row["triton_s"] / 1e12
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return row


TABLE_HEADERS = [
    "case", "T", "d_in", "d_out", "first call s", "Triton ms", "Triton TFLOP/s", "% of bf16 8192³ matmul",
    "% of same-shape bf16 aᵀa", "vs gather+fp32 addmm", "vs bf16 matmul", "vs torch reference",
]


def table_cells(r, peak_tflops: float) -> list:
    same = r.get("bf16_same_shape_tflops")
    ref = r.get("torch_reference_s")
    return [
        r["case"], r["tokens"], r["d_in"], r["d_out"] or "-", f"{r['first_call_s']:.1f}", f"{r['triton_s'] * 1e3:.2f}",
        f"{r['triton_tflops']:.1f}", f"{100 * r['triton_tflops'] / peak_tflops:.0f}%",
        "-" if same is None else f"{100 * r['triton_tflops'] / same:.0f}%",
        f"{r['gather_fp32_addmm_s'] / r['triton_s']:.1f}x", f"{r['bf16_matmul_s'] / r['triton_s']:.2f}x",
        "-" if ref is None else f"{ref / r['triton_s']:.1f}x",
    ]


def format_table(rows, peak_tflops: float) -> str:
    return markdown_table(TABLE_HEADERS, [table_cells(r, peak_tflops) for r in rows])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=262144)
    parser.add_argument("--dims", type=int, nargs="+", default=[4096, 11008])
    parser.add_argument("--d-out", type=int, default=4096, help="d_out of the full-update case")
    parser.add_argument("--split-dims", type=int, nargs="*", default=[576], help="d_in of the split cases")
    parser.add_argument("--no-fp32", action="store_true", help="skip the fp32-input cases")
    parser.add_argument("--save", action="store_true", help="write bench/results/kfac_kernels_<gpu>.{json,md}")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny shapes: check that the script runs (numbers mean nothing)"
    )
    args = parser.parse_args(argv)

    global DEVICE
    from lora_da.kernels import triton_launch

    interpreting = triton_launch.INTERPRETING
    if args.smoke:
        args.tokens, args.dims, args.d_out, args.save, args.split_dims = 100, [70], 45, False, [40]
        if not torch.cuda.is_available() and not interpreting:
            print("bench_kfac_kernels --smoke: no CUDA GPU here; set TRITON_INTERPRET=1 to run the kernels on the CPU.")
            return 1
        DEVICE = "cuda" if torch.cuda.is_available() and not interpreting else "cpu"
    else:
        if not torch.cuda.is_available():
            print("bench_kfac_kernels: no CUDA GPU here; the Triton statistics benchmark needs one. Nothing measured.")
            return 0
        if interpreting:
            print("bench_kfac_kernels: TRITON_INTERPRET=1 is set; unset it to benchmark compiled kernels.")
            return 0
    import triton

    from lora_da.kernels import kfac_stats as reference
    from lora_da.kernels import kfac_stats_triton as kernels

    torch.backends.cuda.matmul.allow_tf32 = False  # the published fp32 addmm is true fp32
    gpu = torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU (Triton interpreter, smoke run)"
    matmul_size = 256 if args.smoke else 8192
    peak = measured_bf16_tflops(matmul_size)
    print(f"device: {gpu}; measured bf16 matmul ({matmul_size}³): {peak:.1f} TFLOP/s; triton {triton.__version__}")
    rows = []
    for d_in in args.dims:
        rows.append(bench_input_factor(args.tokens, d_in, kernels, reference))
        print(format_table(rows[-1:], peak).splitlines()[-1], flush=True)
    for d_in in args.dims:
        rows.append(bench_full_update(args.tokens, d_in, args.d_out, kernels, reference))
        print(format_table(rows[-1:], peak).splitlines()[-1], flush=True)
    # --smoke: 100 tokens would never split by the policy; force 3 splits there
    forced = 3 if args.smoke else None
    for d_in in args.split_dims:
        rows.append(bench_input_factor(args.tokens, d_in, kernels, reference, case="Z split", num_splits=forced))
        rows.append(bench_input_factor(args.tokens, d_in, kernels, reference, case="Z 1 split", num_splits=1))
        print("\n".join(format_table(rows[-2:], peak).splitlines()[-2:]), flush=True)
    if not args.no_fp32:
        for precision in ("ieee", "tf32x3"):
            rows.append(bench_input_factor(
                args.tokens, args.dims[0], kernels, reference, case=f"Z fp32 {precision}",
                dtype=torch.float32, fp32_precision=precision,
            ))
            print(format_table(rows[-1:], peak).splitlines()[-1], flush=True)
    table = format_table(rows, peak)
    print()
    print(table)
    if args.save:
        out = Path(__file__).resolve().parent / "results"
        out.mkdir(exist_ok=True)
        stem = "kfac_kernels_" + re.sub(r"[^A-Za-z0-9]+", "_", gpu).strip("_").lower()
        meta = {
            "device": gpu,
            "torch": torch.__version__,
            "triton": triton.__version__,
            "python": platform.python_version(),
            "measured_bf16_matmul_tflops": peak,
            "rows": rows,
        }
        (out / f"{stem}.json").write_text(json.dumps(meta, indent=2))
        (out / f"{stem}.md").write_text(
            f"# K-FAC statistics kernels on {gpu}\n\ntorch {torch.__version__}, triton {triton.__version__}; "
            f"measured bf16 matmul (8192³): {peak:.1f} TFLOP/s.\n\n{table}\n"
        )
        print(f"wrote {out / stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
