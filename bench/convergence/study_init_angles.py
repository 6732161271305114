"""How far each data-aware arm's ``lora_A`` lies from exact LoRA-DA's (issue #21): principal angles.

    python bench/convergence/study_init_angles.py [--out bench/results/convergence_runs_published/]

Reads the cached init adapters of ``study_inits.py`` (``OUT/cache/<arm>_<key>/``, git-ignored)
and writes ``OUT/init_angles.json`` (committed; ``study_report.py`` prints it): per arm and
module type, the largest principal angle in degrees between the row space of the arm's
``lora_A`` and that of ``lora-da`` (library defaults, the exact solve), max and median over
the 30 layers. It answers whether an arm's init is a different subspace or the same one:
the published 10-iteration ``torch.lobpcg`` (``lora-da-lobpcg10``), the relative-damping
variants, and LoRA-One for scale (a different criterion altogether).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys

from safetensors.torch import load_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
from common import TARGET_MODULES, write_json_atomic  # noqa: E402
from float64_reference import largest_angle_degrees  # noqa: E402

REFERENCE_ARM = "lora-da"
ARMS = ["lora-da-lobpcg10", "lora-da-zrel1e-4", "lora-da-zrel1e-2", "lora-one", "pissa"]
MODULE_TYPES = TARGET_MODULES  # the module types of the tables


def lora_a_rows(cache_dir: str, arm: str) -> tuple:
    """``{module name: lora_A}`` of ``arm``'s cached adapter and the cache key, or ``(None, None)``."""
    found = sorted(glob.glob(os.path.join(cache_dir, f"{arm}_r*", "adapter_model.safetensors")))
    if not found:
        return None, None
    if len(found) > 1:
        raise SystemExit(f"{arm}: {len(found)} cached inits in {cache_dir} (one key expected): {found}")
    tensors = load_file(found[0])
    suffix = ".lora_A.weight"
    rows = {key[: -len(suffix)]: value for key, value in tensors.items() if key.endswith(suffix)}
    return rows, os.path.basename(os.path.dirname(found[0]))[len(arm) + 1:]


def angles_to(reference: dict, other: dict) -> dict:
    """Per module type: the largest principal angle (°) of each layer's row space, max and median."""
    per_type = {t: [] for t in MODULE_TYPES}
    for name, a_ref in reference.items():
        kind = name.rsplit(".", 1)[-1]
        if kind in per_type and name in other:
            per_type[kind].append(largest_angle_degrees(a_ref.double().T, other[name].double().T))
    return {t: {"max": max(v), "median": statistics.median(v), "n": len(v)} for t, v in per_type.items() if v}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench/results/convergence_runs_published/")
    args = p.parse_args(argv)
    cache_dir = os.path.join(args.out, "cache")
    reference, key = lora_a_rows(cache_dir, REFERENCE_ARM)
    if reference is None:
        raise SystemExit(f"no cached {REFERENCE_ARM} init in {cache_dir}: run study_inits.py (or a lora-da run) first")
    result = {"reference_arm": REFERENCE_ARM, "cache_key": key, "unit": "degrees",
              "definition": "largest principal angle between the row spaces of lora_A (r x d_in) of the arm and of "
                            "lora-da, per layer; max and median over layers", "arms": {}}
    for arm in ARMS:
        rows, arm_key = lora_a_rows(cache_dir, arm)
        if rows is None:
            print(f"{arm}: no cached init, left out")
            continue
        if arm_key != key:
            raise SystemExit(f"{arm}: cache key {arm_key} differs from {REFERENCE_ARM}'s {key}")
        result["arms"][arm] = angles_to(reference, rows)
        print(arm, {t: round(v["max"], 4) for t, v in result["arms"][arm].items()})
    path = os.path.join(args.out, "init_angles.json")
    write_json_atomic(path, result)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
