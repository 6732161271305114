"""Benchmark of the batched Ω kernel (``lora_da.kernels.omega_triton``; needs a CUDA GPU).

``Ω_b = −(α/σ_b²) Δ_b Δ_bᵀ + w_b · ½(Z⁻¹_b + Z⁻¹_bᵀ)`` for a batch of same-shape modules,
against the plain-PyTorch reference ``lora_da.kernels.omega`` (batched ``matmul`` and
elementwise passes) on the same device. Cases (Llama-7B shapes, fp32 and fp64):
q_proj-like (d_in = d_out = 4096, 8 modules) and down_proj-like (d_in = 11008,
d_out = 4096, 2 modules).

FLOPs: ``d_in²·d_out`` per module (the kernel computes the upper-triangle tiles of
``Δ Δᵀ`` only; the reference the full product, twice that). Bytes: Δ and Z⁻¹ read, Ω
written once (the kernel's minimum). Times: median of a few runs, ``perf_counter``
with a CUDA synchronize at both ends (``bench/timing.py``). The largest difference
to the reference, relative to the largest entry of Ω, is printed as a sanity check.

Usage: ``python bench/bench_omega_kernel.py [--dtypes fp32 fp64] [--save]``; ``--save``
writes ``bench/results/omega_kernel_<gpu>.json`` and ``.md``. ``--smoke``: tiny shapes,
to check that the script runs; without CUDA it needs ``TRITON_INTERPRET=1`` (the
interpreter) and its numbers mean nothing.
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
from timing import markdown_table, timed  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp64": torch.float64}
CASES = [("q_proj-like", 8, 4096, 4096), ("down_proj-like", 2, 11008, 4096)]
SMOKE_CASES = [("smoke", 2, 70, 45)]
HEADERS = ["case", "dtype", "B", "d_in", "d_out", "Triton ms", "reference ms", "speed-up", "Triton TFLOP/s",
           "Triton GB/s", "max difference / max Ω"]


def bench_case(name, batch, d_in, d_out, dtype, device, kernel, reference, repeat) -> dict:
    generator = torch.Generator(device=device).manual_seed(0)
    delta = torch.randn(batch, d_in, d_out, generator=generator, device=device, dtype=dtype)
    zinv = torch.randn(batch, d_in, d_in, generator=generator, device=device, dtype=dtype)
    sigma = torch.rand(batch, generator=generator, device=device, dtype=dtype) + 0.5
    weight = torch.rand(batch, generator=generator, device=device, dtype=dtype)

    def run_kernel():
        return kernel.guidance_matrices(delta, zinv, sigma, weight, 1.0)

    def run_reference():
        return reference.guidance_matrices(delta, zinv, sigma, weight, 1.0)

    got, expected = run_kernel(), run_reference()
    difference = float((got - expected).abs().max() / expected.abs().max())
    del got, expected
    row = {"case": name, "dtype": str(dtype).replace("torch.", ""), "batch": batch, "d_in": d_in, "d_out": d_out}
    row["triton_s"] = timed(run_kernel, repeat=repeat, device=device).median
    row["reference_s"] = timed(run_reference, repeat=repeat, device=device).median
    row["triton_tflops"] = batch * d_in * d_in * d_out / row["triton_s"] / 1e12
    moved = batch * (d_in * d_out + 2 * d_in * d_in) * delta.element_size()
    row["triton_gbps"] = moved / row["triton_s"] / 1e9
    row["max_relative_difference"] = difference
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


def table_cells(r) -> list:
    return [
        r["case"], r["dtype"], r["batch"], r["d_in"], r["d_out"], f"{r['triton_s'] * 1e3:.2f}",
        f"{r['reference_s'] * 1e3:.2f}", f"{r['reference_s'] / r['triton_s']:.2f}x", f"{r['triton_tflops']:.2f}",
        f"{r['triton_gbps']:.0f}", f"{r['max_relative_difference']:.1e}",
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "fp64"])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--save", action="store_true", help="write bench/results/omega_kernel_<gpu>.{json,md}")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny shapes: check that the script runs (numbers mean nothing)"
    )
    args = parser.parse_args(argv)

    from lora_da.kernels import triton_launch

    interpreting = triton_launch.INTERPRETING
    if args.smoke:
        cases, args.save, args.repeat = SMOKE_CASES, False, 1
        if not torch.cuda.is_available() and not interpreting:
            print("bench_omega_kernel --smoke: no CUDA GPU here; set TRITON_INTERPRET=1 to run the kernel on the CPU.")
            return 1
        device = "cuda" if torch.cuda.is_available() and not interpreting else "cpu"
    else:
        if not torch.cuda.is_available():
            print("bench_omega_kernel: no CUDA GPU here; the Triton Ω benchmark needs one. Nothing measured.")
            return 0
        if interpreting:
            print("bench_omega_kernel: TRITON_INTERPRET=1 is set; unset it to benchmark the compiled kernel.")
            return 0
        cases, device = CASES, "cuda"
    import triton

    from lora_da.kernels import omega as reference
    from lora_da.kernels import omega_triton as kernel

    torch.backends.cuda.matmul.allow_tf32 = False  # the reference's fp32 matmul is true fp32, as the kernel's
    gpu = torch.cuda.get_device_name() if device == "cuda" else "CPU (Triton interpreter, smoke run)"
    print(f"device: {gpu}; triton {triton.__version__}")
    rows = []
    for dtype_name in args.dtypes:
        for name, batch, d_in, d_out in cases:
            dtype = DTYPES[dtype_name]
            rows.append(bench_case(name, batch, d_in, d_out, dtype, device, kernel, reference, args.repeat))
            print(markdown_table(HEADERS, [table_cells(rows[-1])]).splitlines()[-1], flush=True)
    table = markdown_table(HEADERS, [table_cells(r) for r in rows])
    print()
    print(table)
    if args.save:
        out = Path(__file__).resolve().parent / "results"
        out.mkdir(exist_ok=True)
        stem = "omega_kernel_" + re.sub(r"[^A-Za-z0-9]+", "_", gpu).strip("_").lower()
        meta = {"device": gpu, "torch": torch.__version__, "triton": triton.__version__,
                "python": platform.python_version(), "rows": rows}
        (out / f"{stem}.json").write_text(json.dumps(meta, indent=2))
        (out / f"{stem}.md").write_text(
            f"# Batched Ω kernel on {gpu}\n\ntorch {torch.__version__}, triton {triton.__version__}.\n\n{table}\n"
        )
        print(f"wrote {out / stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
