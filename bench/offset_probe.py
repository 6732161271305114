"""Offset-overflow probe of the Triton statistics kernels: element offsets past 2³¹.

    python bench/offset_probe.py                          # T = 200000, d = 11008 (GPU; ~9 GB)
    TRITON_INTERPRET=1 python bench/offset_probe.py --tokens 300 --d-in 70 --d-out 45 --device cpu

With T·d > 2³¹ elements, an offset ``t * stride`` computed in int32 wraps: on a GPU
that is an illegal address (the CUDA context dies: run this in its own process,
as bench/device_check.sh does) or rows read from the wrong place. The rows whose
offsets pass 2³¹ (t ≥ 2³¹ / d) are scaled by 8 (exact in bf16), so that losing or
misreading them changes Z, y and G by far more than rounding: they carry most of
the sums. The kernels' results are compared with the same sums accumulated in
fp32 by PyTorch, chunk by chunk (no offset there exceeds a chunk).

Tolerance: bf16 products are exact in fp32; each sum of T terms rounds by at most
about T·2⁻²⁴ relative to Σ|terms| in the worst case, ~√T·2⁻²⁴ typically (3e-5 at
T = 2e5); both sides round, so the bound on max|kernel − reference| / max|reference|
is 1e-3, well below the ~0.6 change that dropping the scaled rows would make.
Prints PASS/FAIL lines; exit status 1 on any failure.
"""

from __future__ import annotations

import argparse
import sys

import torch

BOUND = 1e-3
CHUNK = 16384


def relative_error(result: torch.Tensor, reference: torch.Tensor) -> float:
    return float((result.double() - reference.double()).abs().max() / reference.double().abs().max())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=200_000)
    parser.add_argument("--d-in", type=int, default=11008)
    parser.add_argument("--d-out", type=int, default=4096)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    from lora_da.kernels import kfac_stats_triton

    device, num_tokens, d_in, d_out = args.device, args.tokens, args.d_in, args.d_out
    tail = min(2**31 // d_in, (3 * num_tokens) // 4)  # first row whose offset passes 2³¹ (or a late row, for tiny runs)
    print(f"offset probe on {device}: T = {num_tokens}, d_in = {d_in}, d_out = {d_out}; T·d_in = {num_tokens * d_in:.3e}, "
          f"T·d_out = {num_tokens * d_out:.3e} (2³¹ = {2**31:.3e}); rows from {tail} scaled by 8", flush=True)
    generator = torch.Generator(device=device).manual_seed(0)
    inputs = torch.randn(num_tokens, d_in, device=device, dtype=torch.bfloat16, generator=generator)
    grads = torch.randn(num_tokens, d_out, device=device, dtype=torch.bfloat16, generator=generator)
    inputs[tail:] *= 8
    grads[tail:] *= 8
    mask = (torch.rand(num_tokens, device=device, generator=generator) < 0.65).float()

    z_ref = torch.zeros(d_in, d_in, device=device)
    y_ref = torch.zeros(d_out, device=device)
    g_ref = torch.zeros(d_out, d_in, device=device)
    for start in range(0, num_tokens, CHUNK):
        a = inputs[start : start + CHUNK].float()
        g = grads[start : start + CHUNK].float()
        m = mask[start : start + CHUNK, None]
        z_ref.addmm_((a * m).T, a)
        y_ref += (m * g * g).sum(0)
        g_ref.addmm_(g.T, a)  # G counts every token (the mask weighs Z and y only)
    del a, g

    failures = 0
    z = torch.zeros(d_in, d_in, device=device)
    y = torch.zeros(d_out, device=device)
    gsum = torch.zeros(d_out, d_in, device=device)
    kfac_stats_triton.accumulate_input_factor(z, inputs, mask)
    kfac_stats_triton.finalize_input_factor(z)
    kfac_stats_triton.accumulate_output_statistics(y, gsum, grads, inputs, mask)
    if device == "cuda":
        torch.cuda.synchronize()
    for name, result, reference in (("Z (input factor)", z, z_ref), ("y (output factor diag)", y, y_ref), ("G", gsum, g_ref)):
        error = relative_error(result, reference)
        scale = reference.abs().max()
        ok = error <= BOUND and bool(torch.isfinite(result).all())
        failures += not ok
        print(f"{'PASS' if ok else 'FAIL'} {name}: max relative error {error:.2e} (bound {BOUND:.0e}; "
              f"reference max {float(scale):.3e})", flush=True)
    print(f"offset_probe: {3 - failures} passed, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
