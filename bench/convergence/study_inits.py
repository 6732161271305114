"""The study's initializations (issue #21), all data-aware ones from ONE statistics pass.

Arms (``ARMS``):

* ``lora``: PEFT's default (Kaiming-uniform A, B = 0), made in the run itself (seeded).
* ``pissa``: ``lora_da.initialize(model, None, method="pissa")`` (no data).
* ``lora-da``: the library's LoRA-DA with its published defaults (α=1, β=0.03, γ=1024,
  λ=1e-6, solver "auto") - :func:`lora_da.methods.lora_da.solve_modules` on the shared
  statistics, i.e. what ``lora_da.initialize`` computes from that pass.
* ``lora-one``: the library's ``lora-one`` solve (defaults) on the same statistics.
* ``lora-da-lobpcg10``: the published solver - per module Ω formed (float64, the reference
  functions of :mod:`lora_da.methods.lora_da_reference`, λ=1e-6 on Z and y) and
  ``torch.lobpcg(Ω, k=r, largest=False, niter=10)``, the global generator seeded with 0
  once before the loop over modules, as ``bench/published_baseline.py`` does.
* ``lora-da-zrel1e-4`` / ``lora-da-zrel1e-2``: Z damped relative to its own scale,
  ``λ_Z = κ·tr(Z)/d_in`` per input group (κ = 1e-4 / 1e-2); ``y`` keeps the published
  ``λ_y = 1e-6`` (so only the Z⁻¹ side changes: Δ = −(Z+λ_Z I)⁻¹Gᵀdiag(1/(y+λ_y)),
  c = Σ1/(y+λ_y)/N/σ²), exact eigenvectors (dense float64 ``eigh``).

The statistics: :func:`lora_da.collect_statistics` (library defaults: per-sample mean
loss, attention token mask, Z in float64) on the first ``calib_n`` training samples
(batches of ``calib_batch``). Each init is saved with ``LoraInit.save_pretrained``
(rsLoRA, ``lora_alpha``) under ``cache_dir/<arm>_<key>/`` with ``init_meta.json``; the
raw input factors ``Z`` (float32, one per input group) go to
``cache_dir/input_factors_<key>.safetensors`` for the energy measure of every run.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Dict, List, Optional

import torch

from common import TARGET_MODULES, collate, file_lock, write_json_atomic

ARMS = ["lora", "lora-da", "lora-one", "lora-da-lobpcg10", "lora-da-zrel1e-4", "lora-da-zrel1e-2", "pissa"]
STATISTICS_ARMS = ["lora-da", "lora-one", "lora-da-lobpcg10", "lora-da-zrel1e-4", "lora-da-zrel1e-2"]
Z_RELATIVE = {"lora-da-zrel1e-4": 1e-4, "lora-da-zrel1e-2": 1e-2}
PUBLISHED_DAMPING = 1e-6
PUBLISHED_NITER = 10


def lora_da_fingerprint() -> dict:
    """Where lora_da was imported from, a hash of its Python sources (methods/ included) and the git commit."""
    import subprocess

    import lora_da

    folder = os.path.dirname(lora_da.__file__)
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if d not in ("__pycache__", "kernels"))
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(root, name)
                with open(path, "rb") as handle:
                    digest.update(os.path.relpath(path, folder).encode() + handle.read())
    commit, dirty = "", False  # only for a lora_da inside a lora-da checkout (python/lora_da), not site-packages
    try:
        top = subprocess.run(["git", "-C", folder, "rev-parse", "--show-toplevel"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
        if top and os.path.realpath(os.path.join(top, "python", "lora_da")) == os.path.realpath(folder):
            commit = subprocess.run(["git", "-C", folder, "rev-parse", "HEAD"], capture_output=True, text=True,
                                    timeout=10).stdout.strip()
            dirty = bool(subprocess.run(["git", "-C", folder, "status", "--porcelain", "--", "."],
                                        capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return {"path": folder, "sources_sha256": digest.hexdigest()[:16], "git_commit": commit, "python_dirty": dirty}


def cache_key(args) -> str:
    return (f"r{args.rank}_a{args.lora_alpha:g}_rs_cal{args.calib_n}_N{args.train_n}_L{args.max_len}"
            f"_ts{args.train_seed}")


def arm_dir(args, arm: str) -> str:
    return os.path.join(args.cache_dir, f"{arm}_{cache_key(args)}")


def z_path(args) -> str:
    return os.path.join(args.cache_dir, f"input_factors_{cache_key(args)}.safetensors")


def _config(args, method: str, **extra):
    from lora_da import LoraDAConfig

    return LoraDAConfig(rank=args.rank, target_modules=TARGET_MODULES, train_size=args.train_n, method=method,
                        progress=False, **extra)


def _lora_init(args, stats, modules, method: str, timings: dict):
    from lora_da import LoraInit

    return LoraInit(modules=modules, config=_config(args, method), train_size=args.train_n,
                    num_samples=stats.num_samples, num_tokens=stats.num_tokens, num_batches=stats.num_batches,
                    skipped_batches=stats.skipped_batches, skipped_samples=stats.skipped_samples, timings=timings)


def _reference_inits(args, stats, names: List[str], z_damping, solver: str) -> Dict[str, object]:
    """LoRA-DA per module with the float64 reference functions; ``z_damping(name, Z_raw) -> λ_Z``;
    ``solver``: ``"lobpcg10"`` (the published call) or ``"eigh"`` (exact)."""
    from lora_da.methods import lora_da_reference as ref

    factors: Dict[int, object] = {}
    result = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for name in names:
            group = stats.modules[name].group_index
            if group not in factors:
                z_raw = stats.input_factor(name).to(torch.float64)
                factors[group] = ref.prepare_input_factor(z_raw, z_damping(name, z_raw), name)
            factor = factors[group]
            prepared = ref.prepare_module(name, stats.gradient(name), factor, stats.output_factor_diag(name),
                                          damping=PUBLISHED_DAMPING, train_size=args.train_n)
            if solver == "eigh":
                values, vectors = ref.dense_eigenpairs(prepared, factor, rank=args.rank, alpha=1.0, beta=0.03)
            else:
                omega = ref.guidance_matrix(prepared.delta_hat, factor.inverse, 1.0, 0.03, prepared.variance_scale)
                values, vectors = torch.lobpcg(omega, k=args.rank, largest=False, niter=PUBLISHED_NITER)
            result[name] = ref.finish_module(name, prepared, values, vectors, gamma=1024.0, damping=factor.damping,
                                             input_group=stats.groups[group].members)
    return result


def _save(args, arm: str, init, meta: dict) -> None:
    folder = arm_dir(args, arm)
    staging = folder + f".tmp{os.getpid()}"
    init.save_pretrained(staging, lora_alpha=args.lora_alpha, use_rslora=True)
    meta = {**meta, "arm": arm, "computed_at": time.strftime("%Y-%m-%d %H:%M:%S"),
            "torch_threads": torch.get_num_threads(), "lora_da": lora_da_fingerprint(),
            "dampings_used": sorted({float(m.damping) for m in init.modules.values()})[:3] + (
                ["..."] if len({m.damping for m in init.modules.values()}) > 3 else [])}
    write_json_atomic(os.path.join(staging, "init_meta.json"), meta)
    os.replace(staging, folder)


def _save_input_factors(args, stats) -> None:
    from safetensors.torch import save_file

    tensors, members = {}, {}
    for index, group in enumerate(stats.groups):
        key = f"group{index}"
        tensors[key] = (group.input_factor_sum / group.num_tokens).to(torch.float32).contiguous()
        members[key] = ",".join(group.members)
    tmp = z_path(args) + f".tmp{os.getpid()}"
    save_file(tensors, tmp, metadata=members)
    os.replace(tmp, z_path(args))


def load_input_factors(args) -> Dict[str, torch.Tensor]:
    """``{module name: raw Z (float32)}`` (modules of one group share the tensor)."""
    from safetensors import safe_open

    out = {}
    with safe_open(z_path(args), framework="pt") as handle:
        members = handle.metadata()
        for key in handle.keys():
            tensor = handle.get_tensor(key)
            for name in members[key].split(","):
                out[name] = tensor
    return out


def ensure_inits(args, model_loader, train_samples, pad_id: int, log) -> None:
    """Compute and cache every missing init of ``ARMS`` (except ``lora``) and the input factors."""
    import lora_da
    from lora_da.methods import get_method
    from lora_da.methods.base import SolveContext
    from lora_da.methods.lora_da import solve_modules
    from lora_da.targets import find_target_modules

    os.makedirs(args.cache_dir, exist_ok=True)
    with file_lock(os.path.join(args.cache_dir, f"inits_{cache_key(args)}.lock")):
        missing = [arm for arm in STATISTICS_ARMS if not os.path.exists(os.path.join(arm_dir(args, arm), "init_meta.json"))]
        if missing or not os.path.exists(z_path(args)):
            model = model_loader()
            calib = train_samples[: args.calib_n]
            if len(calib) < args.calib_n:
                raise ValueError(f"calibration wants {args.calib_n} samples, the train set has {len(calib)}")
            loader = [collate(calib[i: i + args.calib_batch], pad_id) for i in range(0, len(calib), args.calib_batch)]
            targets = find_target_modules(model, TARGET_MODULES, args.rank)
            log(f"statistics pass on {len(calib)} samples for {missing or ['input factors']}")
            start = time.perf_counter()
            stats = lora_da.collect_statistics(model, loader, targets)
            stats_seconds = time.perf_counter() - start
            log(f"statistics: {stats_seconds:.0f} s, {stats.num_tokens} tokens, {len(stats.groups)} input groups")
            _save_input_factors(args, stats)
            common = {"statistics_seconds": stats_seconds, "num_samples": stats.num_samples,
                      "num_tokens": stats.num_tokens, "train_size": args.train_n, "calib_n": args.calib_n}
            names = list(targets)
            for arm in missing:
                start = time.perf_counter()
                timings: dict = {"factor_prep": 0.0, "solve": 0.0}
                if arm == "lora-da":
                    modules, backend = solve_modules(stats, _config(args, "lora-da"), args.train_n, names,
                                                     timings=timings)
                elif arm == "lora-one":
                    config = _config(args, "lora-one")
                    context = SolveContext(settings=config, options=config.options, targets=targets, names=names,
                                           statistics=stats, train_size=args.train_n, timings=timings)
                    modules, backend = get_method("lora-one").solve(context)
                elif arm == "lora-da-lobpcg10":
                    modules = _reference_inits(args, stats, names, lambda n, z: PUBLISHED_DAMPING, "lobpcg10")
                    backend = f"torch.lobpcg niter={PUBLISHED_NITER} on the formed Omega (float64), seed 0"
                else:
                    kappa = Z_RELATIVE[arm]
                    modules = _reference_inits(
                        args, stats, names, lambda n, z: kappa * float(torch.diagonal(z).sum()) / z.shape[0], "eigh")
                    backend = f"dense eigh (float64); lambda_Z = {kappa:g}*tr(Z)/d_in per group, lambda_y = 1e-6"
                seconds = time.perf_counter() - start
                method = "lora-one" if arm == "lora-one" else "lora-da"
                init = _lora_init(args, stats, modules, method, {**timings, "total": seconds})
                _save(args, arm, init, {**common, "solve_seconds": seconds, "solver": backend,
                                        "init_seconds": stats_seconds + seconds})
                log(f"{arm}: solved in {seconds:.0f} s ({backend})")
            del stats
        if not os.path.exists(os.path.join(arm_dir(args, "pissa"), "init_meta.json")):
            model = model_loader()
            start = time.perf_counter()
            init = lora_da.initialize(model, None, rank=args.rank, method="pissa", target_modules=TARGET_MODULES,
                                      progress=False)
            seconds = time.perf_counter() - start
            _save(args, "pissa", init, {"init_seconds": seconds, "solver": "pissa (library)"})
            log(f"pissa: {seconds:.0f} s")


def read_meta(args, arm: str) -> Optional[dict]:
    path = os.path.join(arm_dir(args, arm), "init_meta.json")
    if not os.path.exists(path):
        return None
    with open(path) as handle:
        return json.load(handle)


def energy_ratio(lora_a: torch.Tensor, z_raw: torch.Tensor) -> float:
    """``[tr(A Z Aᵀ)/tr(A Aᵀ)] / [tr(Z)/d_in]`` in float64: the activation energy along A's rows
    (weighted by their squared norms) relative to that of a uniformly random unit direction."""
    a = lora_a.detach().to(torch.float64)
    z = z_raw.to(torch.float64)
    along = float(torch.einsum("ri,ij,rj->", a, z, a)) / float((a * a).sum())
    return along / (float(torch.diagonal(z).sum()) / z.shape[0])


def energy_by_type(model, input_factors: Dict[str, torch.Tensor]) -> Dict[str, dict]:
    """The energy ratio of every PEFT layer's ``lora_A``, summarised per module type (mean/min/max)."""
    from lora_da.layers import peft_lora_layers

    per_type: Dict[str, List[float]] = {}
    layers = peft_lora_layers(model, "default")
    for name, z in input_factors.items():
        matches = [full for full in layers if full == name or full.endswith("." + name)]
        if len(matches) != 1:
            raise ValueError(f"module '{name}' matches {len(matches)} LoRA layers")
        value = energy_ratio(layers[matches[0]].lora_A["default"].weight, z)
        per_type.setdefault(name.rsplit(".", 1)[-1], []).append(value)
    return {kind: {"mean": sum(v) / len(v), "min": min(v), "max": max(v), "n": len(v)}
            for kind, v in per_type.items()}


def lora_a_norms(model) -> Dict[str, float]:
    """Mean ‖lora_A‖_F per module type."""
    from lora_da.layers import peft_lora_layers

    per_type: Dict[str, List[float]] = {}
    for name, layer in peft_lora_layers(model, "default").items():
        per_type.setdefault(name.rsplit(".", 1)[-1], []).append(float(layer.lora_A["default"].weight.detach().norm()))
    return {kind: sum(v) / len(v) for kind, v in per_type.items()}

