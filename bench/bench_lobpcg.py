"""Batched LOBPCG (lora_da.solvers.lobpcg) vs a loop of torch.linalg.eigh vs a
loop of torch.lobpcg(niter=10), on batches of symmetric matrices with a slowly
decaying spectrum (λ_i = −exp(−8i/n), known eigenvectors), k = 8.

    python bench/bench_lobpcg.py                       # n in {576, 1536, 4096}, batch 30
    python bench/bench_lobpcg.py --sizes 1536 --output bench/results/lobpcg_cpu.md
    python bench/bench_lobpcg.py --guidance --sizes 576 1536 --batch 8 [--device cuda]

``--guidance`` instead times the LoRA-DA operator Ω = −αΔ̂Δ̂ᵀ + βcZ⁻¹ (random
Δ̂ with ‖Δ̂‖₂ = 1, SPD Z, with its preconditioner) four ways: Ω applied in
factored form ("operator": GEMMs and triangular solves) or formed once
("dense": one batched GEMM per application), each with the classic LOBPCG
(about nine host transfers per iteration) or the one-exchange variant (one
download and one upload per iteration; what CUDA runs by default). The angle
is against torch.linalg.eigh of Ω formed in float64.

Reports wall time for the whole batch and the largest principal angle (over
the batch) between each method's k-dimensional subspace and the exact one.
Where a loop would take very long (``--sample``), it runs on the first few
problems only and its time is scaled to the batch (marked "*").
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from problems import largest_principal_angle, matrices_with_spectrum, slowly_decaying_spectrum  # noqa: E402
from timing import Timer  # noqa: E402

from lora_da._native import core  # noqa: E402
from lora_da.solvers import LoraDAOperator, lobpcg  # noqa: E402


def guidance_solve(op: LoraDAOperator, k: int, *, one_exchange=None, omega_form: str = "auto",
                   dense_chunk=None, seed: int = 0, tol=None, max_iter: int = 500, largest: bool = False,
                   initial=None) -> tuple:
    """Solves ``op`` (a :class:`LoraDAOperator` with (B, n, d_out) ``delta``) through the core's
    GuidanceRequest with the variant fields that ``lora_da.solvers.lobpcg`` leaves at their
    defaults. Returns ``(report, eigenvectors (B, n, k))``."""
    delta = op.delta.contiguous()
    batch, n, d_out = delta.shape
    dtype = delta.dtype
    name = str(dtype).replace("torch.", "")
    cholesky = op.cholesky.to(device=delta.device, dtype=dtype).contiguous()
    device = delta.device.type
    stream = int(torch.cuda.current_stream(delta.device).cuda_stream) if device == "cuda" else 0
    scale = torch.as_tensor(op.variance_scale, dtype=torch.float64).reshape(-1).expand(batch)
    fields = {}
    keep = [delta, cholesky]
    if op.preconditioner_cholesky is not None:
        factor = op.preconditioner_cholesky.to(device=delta.device, dtype=dtype).contiguous()
        shift = torch.as_tensor(op.preconditioner_shift, dtype=torch.float64).reshape(-1).expand(batch)
        keep.append(factor)
        fields.update(preconditioner_cholesky=factor.data_ptr(), preconditioner_stride=n * n,
                      preconditioner_shift=[float(v) for v in shift.tolist()])
    if initial is not None:
        start = initial.to(device=delta.device, dtype=dtype).transpose(-1, -2).contiguous()
        keep.append(start)
        fields.update(initial=start.data_ptr(), initial_cols=start.shape[1], initial_stride=n * start.shape[1])
    vectors = torch.empty(batch, k, n, dtype=dtype, device=delta.device)
    request = core().GuidanceRequest(
        delta=delta.data_ptr(), delta_column_major=False, d_out=d_out, delta_stride=n * d_out,
        cholesky=cholesky.data_ptr(), cholesky_stride=n * n if cholesky.dim() == 3 else 0,
        alpha=float(op.alpha), variance_scale=[float(v) for v in scale.tolist()], **fields,
        batch=batch, n=n, dtype=name, k=k, guard=None, largest=largest, tol=tol, max_iter=max_iter, seed=seed,
        eigenvectors=vectors.data_ptr(), device=device, stream=stream,
        one_exchange=one_exchange, omega_form=omega_form, dense_chunk=dense_chunk,
    )
    report = core().lobpcg_guidance(request)
    return report, vectors.transpose(-1, -2)


def guidance_problem(batch: int, n: int, d_out: int, *, seed: int = 0, dtype=torch.float64,
                     preconditioned: bool = True, alpha: float = 1.0, beta_c: float = 1e-3,
                     device: str = "cpu") -> LoraDAOperator:
    """A LoRA-DA-shaped operator: Δ̂ with ‖Δ̂‖₂ = 1, Z = GGᵀ/n' + 1e-3 I (condition ~1e3),
    one βc per problem spread over a decade, and the preconditioner of docs/math.md §5.3
    (drawn on the CPU, built in float64 on ``device``)."""
    g = torch.Generator().manual_seed(seed)
    delta = torch.randn(batch, n, d_out, dtype=torch.float64, generator=g).to(device)
    delta = delta / torch.linalg.matrix_norm(delta, ord=2).reshape(batch, 1, 1)
    factor = torch.randn(batch, n, n + 16, dtype=torch.float64, generator=g).to(device)
    eye = torch.eye(n, dtype=torch.float64, device=device)
    z = factor @ factor.mT / (n + 16) + 1e-3 * eye
    del factor
    scale = [beta_c * 10 ** (b / max(batch - 1, 1)) for b in range(batch)]
    fields = {}
    if preconditioned:
        shift = torch.tensor(scale, dtype=torch.float64, device=device).reshape(batch, 1, 1)
        m = shift * eye + alpha * z
        fields = dict(preconditioner_cholesky=torch.linalg.cholesky(m).to(dtype), preconditioner_shift=scale)
    return LoraDAOperator(delta=delta.to(dtype), cholesky=torch.linalg.cholesky(z).to(dtype), alpha=alpha,
                          variance_scale=scale, **fields)


def machine_description() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    memory = ""
    try:
        with open("/proc/meminfo") as info:
            memory = f", {int(info.readline().split()[1]) / 2**20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    return (
        f"{model}, {os.cpu_count()} cores{memory}; torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), Python {platform.python_version()}"
    )


def run_size(n: int, batch: int, k: int, sample: int, tol: float | None) -> list[tuple]:
    distinct = batch if n <= 1536 else 3
    spectrum = slowly_decaying_spectrum(n).expand(batch, n).contiguous()
    matrices, bases = matrices_with_spectrum(spectrum, seed=n, distinct_bases=distinct)
    exact = bases[..., :k]
    rows = []

    with Timer() as timer:
        result = lobpcg(matrices, k, tol=tol)
    elapsed = timer.seconds
    angle = largest_principal_angle(exact, result.eigenvectors).max().item()
    rows.append(
        (n, f"lora_da.lobpcg (batched, fp64, block {result.block_size})", elapsed, False, angle,
         f"{int(result.iterations.min())}-{int(result.iterations.max())} it, all converged: {bool(result.converged.all())}")
    )

    count = min(batch, sample)
    vectors = []
    with Timer() as timer:
        for b in range(count):
            vectors.append(torch.linalg.eigh(matrices[b])[1][:, :k])
    elapsed = timer.seconds * batch / count
    angle = largest_principal_angle(exact[:count], torch.stack(vectors)).max().item()
    rows.append((n, "loop of torch.linalg.eigh (fp64)", elapsed, count < batch, angle, f"{count} of {batch} run"))

    vectors = []
    with Timer() as timer:
        for b in range(batch):
            vectors.append(torch.lobpcg(matrices[b], k=k, niter=10, largest=False)[1])
    elapsed = timer.seconds
    angle = largest_principal_angle(exact, torch.stack(vectors)).max().item()
    rows.append((n, "loop of torch.lobpcg(niter=10) (fp64)", elapsed, False, angle, ""))
    return rows


GUIDANCE_VARIANTS = (("operator", False), ("operator", True), ("dense", False), ("dense", True))


def run_guidance(n: int, batch: int, k: int, device: str, oracle: int) -> list[tuple]:
    """The four ways to solve one batch of LoRA-DA operators (see the module docstring);
    the angle over the first ``oracle`` problems (eigh on ``device``)."""
    op = guidance_problem(batch, n, max(n // 2, 8), seed=n, device=device)
    count = min(batch, oracle)
    sample = LoraDAOperator(delta=op.delta[:count], cholesky=op.cholesky[:count], alpha=op.alpha,
                            variance_scale=op.variance_scale[:count])
    exact = torch.linalg.eigh(sample.dense())[1][..., :k] if count else None
    del sample
    small = guidance_problem(2, 256, 64, device=device)
    guidance_solve(small, k, one_exchange=True, omega_form="dense")  # warm-up (handles, pools)
    rows = []
    for form, one_exchange in GUIDANCE_VARIANTS:
        with Timer(device if device != "cpu" else None) as timer:
            report, found = guidance_solve(op, k, one_exchange=one_exchange, omega_form=form)
        angle = largest_principal_angle(exact, found[:count]).max().item() if count else float("nan")
        iterations = max(report["iterations"])
        method = f"Ω {form}, {'one exchange' if one_exchange else 'classic'}"
        notes = (f"{min(report['iterations'])}-{iterations} it, {report['downloads']} downloads + "
                 f"{report['uploads']} uploads, all converged: {all(report['converged'])}")
        rows.append((n, method, timer.seconds, False, angle, notes))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[576, 1536, 4096])
    parser.add_argument("--batch", type=int, default=30)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--sample", type=int, default=None,
                        help="for n > 1536, run the eigh loop on this many problems and scale (default 3); "
                        "smaller n always run all")
    parser.add_argument("--tol", type=float, default=None, help="LOBPCG tolerance (default: the solver's)")
    parser.add_argument("--output", default=None, help="also write the table (markdown) here")
    parser.add_argument("--guidance", action="store_true", help="time the LoRA-DA operator's four variants instead")
    parser.add_argument("--device", default="cpu", help="with --guidance: cpu or cuda")
    parser.add_argument("--oracle", type=int, default=None,
                        help="with --guidance: problems checked against eigh (default: all for n <= 2048, else 1)")
    args = parser.parse_args(argv)
    if args.guidance:
        guidance_main(args, argv)
        return

    lines = [
        f"Machine: {machine_description()}",
        "",
        f"Batch of {args.batch} problems, k = {args.k}, spectrum λ_i = −exp(−8i/n); "
        "time for the whole batch; angle = largest principal angle to the exact eigenspace over the batch.",
        "",
        "| n | method | time (s) | speed-up of lora_da.lobpcg | largest angle (rad) | notes |",
        "|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    for n in args.sizes:
        sample = args.batch if n <= 1536 else (args.sample if args.sample is not None else 3)
        rows = run_size(n, args.batch, args.k, sample, args.tol)
        ours = rows[0][2]
        for size, method, elapsed, scaled, angle, notes in rows:
            line = (f"| {size} | {method} | {elapsed:.2f}{'*' if scaled else ''} | {elapsed / ours:.1f}x | "
                    f"{angle:.2e} | {notes} |")
            lines.append(line)
            print(line, flush=True)
    lines += ["", "\\* measured on the first problems only, scaled to the batch."]
    print(lines[-1])
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as out:
            out.write("# Batched LOBPCG on CPU\n\n`python " + " ".join(["bench/bench_lobpcg.py"] + (argv or sys.argv[1:])) + "`\n\n")
            out.write("\n".join(lines) + "\n")


def guidance_main(args, argv) -> None:
    lines = [
        f"Machine: {machine_description()}",
        "",
        f"Batch of {args.batch} LoRA-DA operators (d_out = n/2, preconditioned), k = {args.k}, device {args.device}; "
        "time for the whole batch (Ω formed inside the dense rows' time); angle to eigh of Ω in float64 "
        "(over the first problems only for n > 2048, see --oracle).",
        "",
        "| n | variant | time (s) | relative to the first | largest angle (rad) | notes |",
        "|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    for n in args.sizes:
        oracle = args.oracle if args.oracle is not None else (args.batch if n <= 2048 else 1)
        rows = run_guidance(n, args.batch, args.k, args.device, oracle)
        first = rows[0][2]
        for size, method, elapsed, _, angle, notes in rows:
            line = f"| {size} | {method} | {elapsed:.2f} | {elapsed / first:.2f}x | {angle:.2e} | {notes} |"
            lines.append(line)
            print(line, flush=True)
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as out:
            out.write("# LoRA-DA operator: operator vs dense Ω, classic vs one-exchange LOBPCG\n\n`python " +
                      " ".join(["bench/bench_lobpcg.py"] + (argv or sys.argv[1:])) + "`\n\n")
            out.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
