"""Smoke test of the compiled LOBPCG and one Triton kernel on a device (bench/device_check.sh).

    python bench/device_smoke.py --device cuda     # on a GPU machine
    TRITON_INTERPRET=1 python bench/device_smoke.py --device cpu   # the same checks on a CPU

Checks, each printed as one ``PASS``/``FAIL`` line, against float64 PyTorch oracles:

* the build: ``lora_da.build_info()`` (on CUDA the CUDA backend must be compiled in);
* batched LOBPCG in float32 and float64 on its three paths: dense matrices with a
  known spectrum (eigenvalues and subspace against the construction), the LoRA-DA
  operator (against ``torch.linalg.eigh`` of Ω formed in float64, and in float64 the
  solver's residuals recomputed by ``failed_eigenpairs``), and the small-n dense
  fallback (``n < 5·(k + guard)``);
* one call of the Triton statistics kernel (``Z += aᵀ diag(m) a`` in bf16) against
  the float64 sum.

Tolerances: the dense problems have a gap of 0.5 between the k-th and (k+1)-th
eigenvalue of a spectrum in [−1, 1], so the largest principal angle is at most
about ``√k · tol / gap``: 1e-3 in float32 (tol 2e-4) and 1e-7 in float64 (tol 1e-10);
the bounds below leave a factor 10. The kernel's bf16 products are exact in fp32
and only the T additions round: relative error ≤ T·2⁻²⁴ ≈ 1e-4 at T = 1000 (bound 1e-3).
Exit status 1 when any check fails.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import Callable, List

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from problems import largest_principal_angle, matrices_with_spectrum  # noqa: E402

import lora_da  # noqa: E402
from lora_da.solvers import LoraDAOperator, failed_eigenpairs, lobpcg  # noqa: E402

K = 4
ANGLE_BOUND = {torch.float32: 1e-2, torch.float64: 1e-6}
VALUE_BOUND = {torch.float32: 1e-3, torch.float64: 1e-8}  # relative to max |λ|


def gapped_spectrum(n: int) -> torch.Tensor:
    """k eigenvalues in [−1, −0.8], the rest in [−0.3, 1]: a gap of 0.5 after the k-th."""
    low = torch.linspace(-1.0, -0.8, K, dtype=torch.float64)
    high = torch.linspace(-0.3, 1.0, n - K, dtype=torch.float64)
    return torch.cat([low, high])


def check_dense(device: str, dtype: torch.dtype, n: int, expect_fallback: bool) -> str:
    spectrum = gapped_spectrum(n).expand(3, n).contiguous()
    matrices, bases = matrices_with_spectrum(spectrum, seed=n)
    result = lobpcg(matrices.to(device=device, dtype=dtype), K)
    if result.dense_fallback != expect_fallback:
        raise AssertionError(f"dense_fallback is {result.dense_fallback}, expected {expect_fallback} (n={n})")
    if not bool(result.converged.all()):
        raise AssertionError(f"not converged: {result.converged.tolist()}")
    angle = float(largest_principal_angle(bases[..., :K], result.eigenvectors.cpu()).max())
    value_error = float((result.eigenvalues.cpu().double() - spectrum[:, :K]).abs().max())
    if angle > ANGLE_BOUND[dtype] or value_error > VALUE_BOUND[dtype]:
        raise AssertionError(f"angle {angle:.1e} (bound {ANGLE_BOUND[dtype]:.0e}), eigenvalue error {value_error:.1e}")
    if device == "cuda" and "cuda" not in result.backend:
        raise AssertionError(f"ran on backend {result.backend!r}, not CUDA")
    return f"backend {result.backend}, angle {angle:.1e}, eigenvalue error {value_error:.1e}, iterations {result.iterations.tolist()}"


def check_operator(device: str, dtype: torch.dtype, n: int = 256, d_out: int = 96) -> str:
    generator = torch.Generator().manual_seed(1)
    delta = torch.randn(2, n, d_out, dtype=torch.float64, generator=generator)
    delta = delta / torch.linalg.matrix_norm(delta, ord=2)[:, None, None]
    activations = torch.randn(2, 4 * n, n, dtype=torch.float64, generator=generator)
    input_factor = activations.mT @ activations / (4 * n) + 1e-3 * torch.eye(n, dtype=torch.float64)
    cholesky = torch.linalg.cholesky(input_factor)
    operator = LoraDAOperator(delta=delta.to(device=device, dtype=dtype), cholesky=cholesky.to(device=device, dtype=dtype),
                              alpha=1.0, variance_scale=[1e-2, 3e-2])
    result = lobpcg(operator, K)
    exact = LoraDAOperator(delta=delta, cholesky=cholesky, alpha=1.0, variance_scale=[1e-2, 3e-2])
    values, vectors = torch.linalg.eigh(exact.dense())
    # the solver's residuals recomputed in float64 (its orthonormality test, 1e-8, is for float64 vectors)
    failed = failed_eigenpairs(operator, result) if dtype == torch.float64 else ~result.converged
    if bool(failed.any()):
        raise AssertionError(f"failed the float64 residual check: {failed.tolist()} (converged {result.converged.tolist()})")
    scale = float(values.abs().amax())
    value_error = float((result.eigenvalues.cpu().double() - values[:, :K]).abs().max()) / scale
    gap = float((values[:, K] - values[:, K - 1]).min()) / scale
    angle = float(largest_principal_angle(vectors[..., :K], result.eigenvectors.cpu()).max())
    bound = ANGLE_BOUND[dtype] / max(gap, 1e-3) * 0.5  # the angle bound scales as 1/gap (the dense cases' gap is 0.5)
    if value_error > VALUE_BOUND[dtype] or angle > bound:
        raise AssertionError(f"eigenvalue error {value_error:.1e}, angle {angle:.1e} (bound {bound:.1e}, relative gap {gap:.1e})")
    if device == "cuda" and "cuda" not in result.backend:
        raise AssertionError(f"ran on backend {result.backend!r}, not CUDA")
    return f"backend {result.backend}, angle {angle:.1e}, relative eigenvalue error {value_error:.1e}, iterations {result.iterations.tolist()}"


def check_triton(device: str, num_tokens: int = 1000, d_in: int = 160) -> str:
    from lora_da.kernels import kfac_stats_triton, triton_launch

    generator = torch.Generator().manual_seed(2)
    inputs = torch.randn(num_tokens, d_in, generator=generator).to(torch.bfloat16)
    mask = (torch.rand(num_tokens, generator=generator) < 0.7).float()
    expected = (inputs.double() * mask.double()[:, None]).T @ inputs.double()
    accumulator = torch.zeros(d_in, d_in, device=device)
    kfac_stats_triton.accumulate_input_factor(accumulator, inputs.to(device), mask.to(device))
    kfac_stats_triton.finalize_input_factor(accumulator)
    error = float((accumulator.cpu().double() - expected).abs().max() / expected.abs().max())
    if error > 1e-3:
        raise AssertionError(f"relative error {error:.1e} against the float64 sum")
    return f"relative error {error:.1e} (interpreter: {triton_launch.INTERPRETING})"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = args.device
    info = lora_da.build_info()
    print(f"lora_da {lora_da.__file__}; build_info {info}; torch {torch.__version__}; device {device}", flush=True)
    checks: List[tuple] = []
    if device == "cuda":
        checks.append(("build: CUDA backend compiled in", lambda: str(info["cuda"]) if info["cuda"] else (_ for _ in ()).throw(
            AssertionError("lora_da._core has no CUDA backend"))))
    for dtype in (torch.float32, torch.float64):
        name = str(dtype).replace("torch.", "")
        checks.append((f"lobpcg dense {name} (n=300)", lambda dtype=dtype: check_dense(device, dtype, 300, False)))
        checks.append((f"lobpcg operator {name} (n=256)", lambda dtype=dtype: check_operator(device, dtype)))
        checks.append((f"lobpcg small-n fallback {name} (n=40)", lambda dtype=dtype: check_dense(device, dtype, 40, True)))
    checks.append(("triton input-factor kernel (bf16)", lambda: check_triton(device)))
    failures = 0
    for name, check in checks:
        try:
            detail = check()
            print(f"PASS {name}: {detail}", flush=True)
        except Exception as error:  # report every check, then fail
            failures += 1
            print(f"FAIL {name}: {type(error).__name__}: {error}", flush=True)
            traceback.print_exc(limit=3)
    print(f"device_smoke: {len(checks) - failures} passed, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
