"""Every method's factors on the built-in tiny Llama, saved so two commits can be compared bitwise.

    python bench/factors_snapshot.py save before.safetensors     # on one commit
    python bench/factors_snapshot.py save after.safetensors      # on another
    python bench/factors_snapshot.py compare before.safetensors after.safetensors

``save`` runs ``lora_da.initialize`` on CPU with one thread (so BLAS reductions
run in one order) for every method, plus LoRA-DA's variants (dense ``eigh``
solver, a ``max_memory`` budget that forces one pass per layer, the ``labels``
token mask, ``preserve_output``), and stores ``lora_A``, ``lora_B`` and the
eigen/singular values of every module. ``compare`` prints, per case, whether
every tensor is bitwise identical, and exits 1 when one is not. Only the public
API is used, so the script runs on any commit that has ``initialize(method=...)``.
"""

from __future__ import annotations

import argparse
import sys
import warnings

import torch
from safetensors.torch import load_file, save_file

RANK = 4
METHODS = ("lora-da", "lora", "pissa", "milora", "lora-ga", "lora-one", "cntlora", "fisher-subspace")
NO_DATA = ("lora", "pissa", "milora")


def cases():
    """``(case name, initialize keyword arguments)``."""
    for method in METHODS:
        yield method, {"method": method}
    yield "lora-da:eigh", {"solver": "eigh"}
    yield "lora-da:passes", {"max_memory": 60_000}
    yield "lora-da:labels", {"token_mask": "labels"}
    yield "lora-da:preserve", {"preserve_output": True}


def snapshot() -> dict:
    import lora_da
    from lora_da.models import batches, synthetic_samples, tiny_llama

    torch.set_num_threads(1)
    loader = list(batches(synthetic_samples(12, seed=0), 4))
    tensors = {}
    for case, kwargs in cases():
        model = tiny_llama(seed=0)
        data = None if kwargs.get("method") in NO_DATA else loader
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            init = lora_da.initialize(model, data, rank=RANK, train_size=1000, progress=False, **kwargs)
        for name, module in init.modules.items():
            tensors[f"{case}/{name}/lora_A"] = module.lora_A.contiguous()
            tensors[f"{case}/{name}/lora_B"] = module.lora_B.contiguous()
            tensors[f"{case}/{name}/values"] = module.eigenvalues.contiguous()
            tensors[f"{case}/{name}/scalars"] = torch.tensor(
                [module.sigma, module.variance_scale, module.damping], dtype=torch.float64
            )
        print(f"{case:<18} {len(init.modules)} modules, passes {init.passes}")
    return tensors


def compare(before_path: str, after_path: str) -> int:
    before, after = load_file(before_path), load_file(after_path)
    status = 0
    case_names = sorted({key.split("/", 1)[0] for key in before} | {key.split("/", 1)[0] for key in after})
    for case in case_names:
        keys_b = {k for k in before if k.startswith(case + "/")}
        keys_a = {k for k in after if k.startswith(case + "/")}
        if keys_b != keys_a:
            print(f"{case:<18} DIFFERENT modules: {sorted(keys_b ^ keys_a)[:3]}")
            status = 1
            continue
        differing = [k for k in sorted(keys_b) if not torch.equal(before[k], after[k])]
        if differing:
            worst = max(float((before[k].double() - after[k].double()).abs().max()) for k in differing)
            print(f"{case:<18} DIFFERENT: {len(differing)} of {len(keys_b)} tensors, max |diff| {worst:.3g}")
            status = 1
        else:
            print(f"{case:<18} bitwise identical ({len(keys_b)} tensors)")
    return status


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    save = sub.add_parser("save")
    save.add_argument("path")
    cmp = sub.add_parser("compare")
    cmp.add_argument("before")
    cmp.add_argument("after")
    args = parser.parse_args(argv)
    if args.command == "save":
        save_file(snapshot(), args.path)
        print(f"wrote {args.path}")
        return 0
    return compare(args.before, args.after)


if __name__ == "__main__":
    sys.exit(main())
