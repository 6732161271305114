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


def run(rank: int, world: int, port: int, scenario: str, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        model = tiny_llama(dtype=torch.float64)
        kwargs = dict(rank=RANK, train_size=TRAIN_SIZE, progress=False)
        if scenario == "even":
            model = torch.nn.parallel.DistributedDataParallel(model)
        if scenario == "fsdp":  # FSDP2: parameters sharded, forward hooks see full activations
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (world,))
            for layer in model.model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
        if scenario == "uneven":
            kwargs["gather_to"] = 0
        if scenario == "raise":
            kwargs["loss_fn"] = raising_loss
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
