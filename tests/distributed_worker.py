"""Worker of tests/test_distributed.py: one rank of a gloo process group."""

import os
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist

import lora_da
from lora_da.models import batches, synthetic_samples, tiny_llama

RANK = 4
TRAIN_SIZE = 100
# scenario "methods": these data methods other than lora-da, each on an even shard
OTHER_METHODS = ("lora-ga", "fisher-subspace", "cntlora")


def all_batches():
    return list(batches(synthetic_samples(12, seed=11), 2))  # 6 batches


def shard(scenario: str, rank: int, world: int):
    data = all_batches()
    if scenario in ("even", "raise", "fsdp", "methods"):
        return data[rank::world]
    if scenario == "uneven":  # world 3: 4 batches, 2 batches, 1 batch whose mask keeps nothing
        if rank == 0:
            return data[:4]
        if rank == 1:
            return data[4:6]
        empty = {k: v.clone() for k, v in data[0].items()}
        empty["attention_mask"].zero_()
        return [empty]
    raise ValueError(scenario)


# scenarios of misuse: each rank runs these cases in turn and records the error of each
# world 2: arguments that differ between the ranks (or gather_to outside the group), then FSDP2
# with 3 batches on rank 0 and 2 on rank 1, as lists (len() known) and as generators
MISUSE = ("rank", "gather_to", "gather_to_range", "fsdp_lists", "fsdp_generators")


def misuse_kwargs(case: str, rank: int) -> dict:
    if case == "rank":  # with gather_to=0, today's code aborted in gather_module_inits
        return {"rank": RANK if rank == 0 else RANK + 1, "gather_to": 0}
    if case == "gather_to":
        return {"gather_to": 0 if rank == 0 else None}
    if case == "gather_to_range":
        return {"gather_to": 2}  # the same on every rank, but there are only 2 ranks
    return {}


def union(scenario: str):
    return all_batches()


def raising_loss(model, batch):
    from lora_da.losses import causal_lm_per_sample_loss

    if dist.get_rank() == 1:
        raise ValueError("boom on rank 1")
    return causal_lm_per_sample_loss(model, batch)


def summarize(init):
    return {
        "modules": {
            name: (m.lora_A, m.lora_B, m.eigenvalues, m.sigma, m.variance_scale) for name, m in init.modules.items()
        },
        "num_samples": init.num_samples,
        "num_tokens": init.num_tokens,
        "skipped_batches": init.skipped_batches,
        "backends": init.backends,
        "timings": init.timings,
    }


def fsdp2(model, world: int) -> None:
    """FSDP2 in place: parameters sharded, forward hooks see full activations."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def run(rank: int, world: int, port: int, scenario: str, out_dir: str, timeout_s: float = 60.0) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
    try:
        model = tiny_llama(dtype=torch.float64)
        kwargs = dict(rank=RANK, train_size=TRAIN_SIZE, progress=False)
        if scenario == "even":
            model = torch.nn.parallel.DistributedDataParallel(model)
        if scenario == "fsdp":
            fsdp2(model, world)
        if scenario == "uneven":
            kwargs["gather_to"] = 0
        if scenario == "raise":
            kwargs["loss_fn"] = raising_loss
        if scenario == "misuse":  # {case: error text, or None when it did not raise}
            errors = {}
            for case in MISUSE:
                data = shard("even", rank, world)
                if case.startswith("fsdp"):
                    if case == "fsdp_lists":
                        fsdp2(model, world)
                    data = all_batches()[: 3 - rank]
                if case == "fsdp_generators":
                    data = iter(data)
                try:
                    lora_da.initialize(model, data, **{**kwargs, **misuse_kwargs(case, rank)})
                    errors[case] = None
                except Exception as error:
                    errors[case] = f"{type(error).__name__}: {error}"
            torch.save(errors, os.path.join(out_dir, f"rank{rank}.pt"))
            return
        try:
            if scenario == "methods":  # {method: summary}
                data = shard(scenario, rank, world)
                summary = {m: summarize(lora_da.initialize(model, data, method=m, **kwargs)) for m in OTHER_METHODS}
            else:
                summary = summarize(lora_da.initialize(model, shard(scenario, rank, world), **kwargs))
            torch.save(summary, os.path.join(out_dir, f"rank{rank}.pt"))
        except Exception as error:  # recorded for the test to compare across ranks
            with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
                f.write(f"{type(error).__name__}: {error}\n---\n{traceback.format_exc()}")
    finally:
        dist.destroy_process_group()
