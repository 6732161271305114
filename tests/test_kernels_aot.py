"""Ahead-of-time compilation of every Triton kernel for sm_90 and sm_80 (no GPU needed),
and the 64-bit address arithmetic of the compiled code (``pytest -k aot``).

Each job compiles one kernel with ``triton.compile(ASTSource(...), target=GPUTarget(...))``
through the whole pipeline (TTIR, TTGIR, LLVM IR, PTX, cubin with the ptxas that ships
with Triton), for one autotune configuration, input dtype and launch variant, with the
argument specialization the JIT would give a real launch (integer arguments equal to 1
become constants, multiples of 16 and pointers carry the divisibility hint). Any compile
error fails the job. The compiled TTIR must form every address with int64 offsets
(``tt.addptr`` of an ``i64`` offset): int32 offsets wrap at 2³¹ elements, which the
token count x row stride of one large batch exceeds (262144 x 11008 = 2.9e9).

The compiles run in a child process with ``TRITON_INTERPRET=0`` (the suite imports the
kernels under the interpreter), one process per test module: this file is also that
child (``python tests/test_kernels_aot.py`` reads jobs as JSON on stdin).

Default suite: :func:`default_jobs`, every autotune configuration of each statistics
kernel on sm_90 (the dtypes, weight/split flags and input layouts spread over them),
one job per kernel on sm_80, the split reduction and both Ω dtypes on both targets.
``--runslow`` adds :func:`full_jobs`: every configuration x dtype x flag x target.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import re
import subprocess
import sys
import time

import pytest

TARGETS = {"sm90": 90, "sm80": 80}
STATISTICS_DTYPES = ("fp32", "bf16", "fp16")
TORCH_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp64": "float64"}
# A Llama-7B-shaped launch: T tokens, d_in = d_out = 4096 (the values only set the
# specialization: which integers are 1 or multiples of 16).
TOKENS, D_IN, D_OUT, SPLITS = 262144, 4096, 4096, 4


def _job(kernel, target, dtype, config=None, weights=False, split=False, layout="rows", precision="ieee"):
    return {
        "kernel": kernel, "target": target, "dtype": dtype, "config": config,
        "weights": weights, "split": split, "layout": layout, "precision": precision,
    }


def _job_id(job) -> str:
    parts = [job["kernel"], job["target"], job["dtype"]]
    if job["config"] is not None:
        parts.append("D{}-T{}-w{}-s{}".format(*job["config"]))
    parts += [name for name in ("weights", "split") if job[name]]
    if job["layout"] != "rows":
        parts.append(job["layout"])
    if job["precision"] != "ieee":
        parts.append(job["precision"])
    return "-".join(parts)


def _statistics_tiles():
    from lora_da.kernels import triton_launch

    return [tuple(tile) for tile in triton_launch.STATISTICS_TILES]


def default_jobs() -> list:
    tiles = _statistics_tiles()
    jobs = []
    for kernel in ("input_factor", "output_statistics"):
        for i, tile in enumerate(tiles):  # every configuration on sm_90; dtypes and flags spread over them
            jobs.append(_job(kernel, "sm90", STATISTICS_DTYPES[i % 3], tile, weights=i % 2 == 0,
                             split=(i // 2) % 2 == 0, layout="columns" if i == 5 else "rows"))
        jobs.append(_job(kernel, "sm90", "fp32", tiles[0], weights=True, precision="tf32x3"))
        jobs.append(_job(kernel, "sm80", "bf16", tiles[1], weights=True, split=True))
    for target in TARGETS:
        jobs.append(_job("reduce_splits", target, "fp32", layout="upper"))
        jobs.append(_job("reduce_splits", target, "fp32"))
        jobs += [_job("omega", target, dtype) for dtype in ("fp32", "fp64")]
    return jobs


def full_jobs() -> list:
    tiles = _statistics_tiles()
    jobs = []
    for kernel, target, tile, dtype, weights, split in itertools.product(
        ("input_factor", "output_statistics"), TARGETS, tiles, STATISTICS_DTYPES, (False, True), (False, True)
    ):
        jobs.append(_job(kernel, target, dtype, tile, weights=weights, split=split))
    for kernel, target, precision in itertools.product(("input_factor", "output_statistics"), TARGETS, ("tf32", "tf32x3")):
        jobs.append(_job(kernel, target, "fp32", tiles[0], weights=True, precision=precision))
    seen = {_job_id(job) for job in default_jobs()}
    return [job for job in jobs if _job_id(job) not in seen]


# ---------------------------------------------------------------------------------------
# The child process: build each job's ASTSource and compile it
# ---------------------------------------------------------------------------------------
def _pointer(dtype: str):
    return ("pointer", dtype)


def _launch_arguments(job, kernels):
    """(function, {argument name: example value}, {constexpr name: value}, num_warps, num_stages)."""
    from lora_da.kernels import kfac_stats_triton, omega_triton, triton_launch

    dtype, split = job["dtype"], job["split"]
    torch_dtype = getattr(kernels["torch"], TORCH_DTYPE_NAMES[dtype])
    columns = job["layout"] == "columns"  # inputs as a transposed view: token stride 1

    def strides(num_tokens, dim):
        return (1, num_tokens) if columns else (dim, 1)

    if job["kernel"] in ("input_factor", "output_statistics"):
        block_d, block_t, warps, stages = job["config"]
        splits = triton_launch.token_splits(TOKENS, 1, 1, SPLITS if split else 1)
        common = {
            "HAS_WEIGHTS": job["weights"], "SPLIT": split, "UPCAST": False,
            "DOT_PRECISION": triton_launch.dot_precision(torch_dtype, job["precision"]),
            "BLOCK_D": block_d, "BLOCK_T": block_t,
        }
        weights = _pointer("fp32") if job["weights"] else _pointer(dtype)
        stride_at, stride_ad = strides(TOKENS, D_IN)
        if job["kernel"] == "input_factor":
            values = {
                "out_ptr": _pointer("fp32"), "inputs_ptr": _pointer(dtype), "weights_ptr": weights,
                "num_tokens": TOKENS, "d_in": D_IN, "tokens_per_split": splits.tokens_per_split,
                "token_bucket": splits.bucket, "stride_os": D_IN * D_IN if split else 0,
                "stride_or": D_IN, "stride_oc": 1, "stride_at": stride_at, "stride_ad": stride_ad,
            }
            return kfac_stats_triton._input_factor_kernel.fn, values, common, warps, stages
        stride_gt, stride_gd = strides(TOKENS, D_OUT)
        values = {
            "diag_out_ptr": _pointer("fp32"), "grad_out_ptr": _pointer("fp32"), "grads_ptr": _pointer(dtype),
            "inputs_ptr": _pointer(dtype), "weights_ptr": weights, "num_tokens": TOKENS, "d_out": D_OUT,
            "d_in": D_IN, "tokens_per_split": splits.tokens_per_split, "token_bucket": splits.bucket,
            "stride_ys": D_OUT if split else 0, "stride_y": 1, "stride_os": D_OUT * D_IN if split else 0,
            "stride_or": D_IN, "stride_oc": 1, "stride_gt": stride_gt, "stride_gd": stride_gd,
            "stride_at": stride_at, "stride_ad": stride_ad,
        }
        return kfac_stats_triton._output_statistics_kernel.fn, values, common, warps, stages
    if job["kernel"] == "reduce_splits":
        values = {
            "sum_ptr": _pointer("fp32"), "partial_ptr": _pointer("fp32"), "num_rows": D_OUT, "num_cols": D_IN,
            "num_splits": SPLITS, "split_stride": D_OUT * D_IN, "stride_sr": D_IN, "stride_sc": 1,
        }
        constants = {"UPPER": job["layout"] == "upper", "BLOCK": kfac_stats_triton.REDUCE_BLOCK}
        return kfac_stats_triton._reduce_splits_kernel, values, constants, 4, 2
    if job["kernel"] == "omega":
        blocks = triton_launch.omega_blocks(torch_dtype, interpreting=False)
        batch_stride_d, batch_stride_z = D_IN * D_OUT, D_IN * D_IN
        values = {
            "omega_ptr": _pointer(dtype), "delta_ptr": _pointer(dtype), "zinv_ptr": _pointer(dtype),
            "bias_scale_ptr": _pointer(dtype), "weight_ptr": _pointer(dtype), "d_in": D_IN, "d_out": D_OUT,
            "stride_ob": batch_stride_z, "stride_or": D_IN, "stride_oc": 1, "stride_db": batch_stride_d,
            "stride_dr": D_OUT, "stride_dc": 1, "stride_zb": batch_stride_z, "stride_zr": D_IN, "stride_zc": 1,
        }
        constants = {
            "USE_DOT": blocks.use_dot, "DOT_PRECISION": triton_launch.dot_precision(torch_dtype),
            "BLOCK_D": blocks.block_d, "BLOCK_K": blocks.block_k,
        }
        return omega_triton._guidance_matrices_kernel, values, constants, blocks.num_warps, 2
    raise ValueError(f"unknown kernel {job['kernel']!r}")


def _specialize(fn, values, constants):
    """Signature, constexprs and divisibility hints as the JIT derives them from real arguments."""
    signature, constexprs, attrs = {}, dict(constants), {}
    for index, name in enumerate(fn.arg_names):
        if name in constants:
            signature[name] = "constexpr"
            continue
        value = values[name]
        if isinstance(value, tuple):
            signature[name] = "*" + value[1]
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif value == 1:
            signature[name], constexprs[name] = "constexpr", 1
        else:
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


ADDPTR = re.compile(r"tt\.addptr [^:]*: (?P<pointer>.+?), (?P<offset>[^,]+?) loc\(")


WIDE_OFFSET = re.compile(r"i64|tensor<(\d+x)+i64>")


def _offset_types(ttir: str) -> list:
    """The offset type of every ``tt.addptr`` in a TTIR listing (``i64``, ``tensor<64x32xi64>``...)."""
    return [match.group("offset").strip() for match in ADDPTR.finditer(ttir)]


def compile_job(job, kernels) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn, values, constants, warps, stages = _launch_arguments(job, kernels)
    signature, constexprs, attrs = _specialize(fn, values, constants)
    start = time.perf_counter()
    try:
        source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(
            source, target=GPUTarget("cuda", TARGETS[job["target"]], 32),
            options={"num_warps": warps, "num_stages": stages},
        )
    except Exception as error:  # noqa: BLE001 - every compile error is reported to the test
        return {"ok": False, "error": f"{type(error).__name__}: {error}"[:4000], "seconds": 0.0}
    return {
        "ok": True,
        "seconds": time.perf_counter() - start,
        "stages": sorted(compiled.asm),
        "cubin_bytes": len(compiled.asm.get("cubin", b"")),
        "offset_types": _offset_types(compiled.asm["ttir"]),
        "triton": triton.__version__,
    }


def _child_main() -> int:
    import torch

    jobs = json.load(sys.stdin)
    kernels = {"torch": torch}
    results = {}
    for job in jobs:
        job["config"] = tuple(job["config"]) if job["config"] is not None else None
        results[_job_id(job)] = compile_job(job, kernels)
    json.dump(results, sys.stdout)
    return 0


# ---------------------------------------------------------------------------------------
# The tests
# ---------------------------------------------------------------------------------------
def run_jobs(jobs, cache_dir) -> dict:
    """Compile ``jobs`` in one child process (compiled mode, Triton's cache in the empty
    ``cache_dir``: every job really compiles); ``{job id: result}``."""
    if not jobs:
        return {}
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1", TRITON_CACHE_DIR=str(cache_dir))
    # the child imports the lora_da this process would (installed, or a development tree)
    package_root = os.path.dirname(os.path.dirname(importlib.util.find_spec("lora_da").origin))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, os.path.abspath(__file__)], input=json.dumps(jobs), env=env,
        capture_output=True, text=True, timeout=1800,
    )
    assert done.returncode == 0, f"AOT compile process failed:\n{done.stderr[-4000:]}"
    return json.loads(done.stdout)


def _selected_jobs(request, test_name):
    """The jobs of the tests of ``test_name`` that this session runs (``-k`` honoured)."""
    return [
        item.callspec.params["job"]
        for item in request.session.items
        if item.originalname == test_name and item.get_closest_marker("skip") is None
    ]


@pytest.fixture(scope="module")
def default_results(request, tmp_path_factory):
    return run_jobs(_selected_jobs(request, "test_aot_compiles"), tmp_path_factory.mktemp("triton-cache"))


@pytest.fixture(scope="module")
def full_results(request, tmp_path_factory):
    return run_jobs(_selected_jobs(request, "test_aot_compiles_full_sweep"), tmp_path_factory.mktemp("triton-cache"))


def _check(result, job):
    assert result["ok"], f"{_job_id(job)} does not compile:\n{result['error']}"
    assert result["cubin_bytes"] > 0, f"{_job_id(job)}: no cubin"
    narrow = [offset for offset in result["offset_types"] if not WIDE_OFFSET.fullmatch(offset)]
    assert result["offset_types"] and not narrow, (
        f"{_job_id(job)}: addresses formed with 32-bit offsets {narrow} (they wrap past 2^31 elements)"
    )


@pytest.mark.parametrize("job", default_jobs(), ids=_job_id)
def test_aot_compiles(default_results, job):
    _check(default_results[_job_id(job)], job)


@pytest.mark.slow
@pytest.mark.parametrize("job", full_jobs(), ids=_job_id)
def test_aot_compiles_full_sweep(full_results, job):
    _check(full_results[_job_id(job)], job)


def test_aot_offset_check_catches_int32_offsets():
    """The IR check itself: a kernel forming ``t * stride`` in int32 is caught, its int64 twin passes."""
    pytest.importorskip("triton")
    sample = (
        "%5 = tt.addptr %3, %4 : tensor<64x32x!tt.ptr<bf16>>, tensor<64x32xi32> loc(#loc3)\n"
        "%9 = tt.addptr %7, %8 : tensor<64x!tt.ptr<f32>>, tensor<64xi64> loc(#loc4)\n"
        "%2 = tt.addptr %arg0, %1 : !tt.ptr<f32>, i64 loc(#loc5)\n"
    )
    assert _offset_types(sample) == ["tensor<64x32xi32>", "tensor<64xi64>", "i64"]
    with pytest.raises(AssertionError, match="32-bit offsets"):
        _check({"ok": True, "cubin_bytes": 1, "offset_types": _offset_types(sample)}, _job("omega", "sm90", "fp32"))


if __name__ == "__main__":
    sys.exit(_child_main())
