"""Scale out on ``torch.distributed``: sharded statistics, distributed solves.

When a process group is initialized, :func:`lora_da.initialize` runs on every
rank with that rank's share of the data (e.g. a ``DistributedSampler`` loader):

1. each rank runs the statistics pass on its own batches (no rank sees another
   rank's activations);
2. the ranks agree on the shared-input groups (a rank whose share was empty
   takes them from the others) and all-reduce the sums — ``Z``'s upper
   triangle only, ``y``, ``G`` and the token/sample counts (also every group's and
   module's own token count) — in buckets;
3. input groups are split between ranks by estimated solve cost (longest
   processing time first), each rank solves its share;
4. every rank owning results broadcasts them (or sends them to ``gather_to``).

A rank that raises during a phase does not leave the others waiting in the
next collective: every phase ends with an exchange of status, after which all
ranks raise the same :class:`DistributedError` naming the failing rank.

Before any of it, every rank checks that all were called alike
(:mod:`lora_da.distributed_agreement`).
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from .layers import linear_dims
from .module_init import ModuleInit
from .statistics import InputGroup, KFACStatistics, ModuleStatistics

T = TypeVar("T")

# Elements per all-reduce bucket (64 MiB of float32).
BUCKET_ELEMENTS = 1 << 24


class DistributedError(RuntimeError):
    """A rank failed; raised on every rank with the same message."""


def is_active() -> bool:
    """True when a default process group with more than one rank is initialized."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper (its forward runs
    collectives of its own that uneven shards would deadlock)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def run_agreeing(phase: str, function: Callable[[], T]) -> T:
    """Run ``function`` on every rank; if any rank raises, all raise the same error."""
    error: Optional[BaseException] = None
    result = None
    try:
        result = function()
    except BaseException as caught:  # noqa: BLE001 - re-raised below, on every rank
        error = caught
    message = None if error is None else f"{type(error).__name__}: {error}"
    messages: List[Optional[str]] = [None] * dist.get_world_size()
    dist.all_gather_object(messages, message)
    raise_failures(phase, messages, error)
    return result


def raise_failures(phase: str, messages: Sequence[Optional[str]], error: Optional[BaseException]) -> None:
    """Raise the same error on every rank when any rank's message is not ``None``: a
    :class:`DistributedError` every rank raised alike as it is, else one naming the first failing rank."""
    failed = [(rank, text) for rank, text in enumerate(messages) if text is not None]
    if not failed:
        return
    if isinstance(error, DistributedError) and len(failed) == len(messages) and len(set(messages)) == 1:
        raise error  # already the same on every rank (e.g. from AgreedBatches)
    rank, text = failed[0]
    raise DistributedError(f"lora-da: rank {rank} failed during {phase}: {text}") from error


# -- statistics -----------------------------------------------------------------------


def _layout(stats: KFACStatistics) -> Optional[list]:
    if not stats.groups:
        return None
    return [
        (group.members, group.input_factor_sum.shape[0], str(group.input_factor_sum.dtype).replace("torch.", ""))
        for group in stats.groups
    ]


def synchronize_layout(stats: KFACStatistics, modules: Dict[str, nn.Linear], device: torch.device) -> None:
    """Make every rank hold the same groups and accumulators (zeros where it saw no batch)."""
    layouts: List[Optional[list]] = [None] * dist.get_world_size()
    dist.all_gather_object(layouts, _layout(stats))
    seen = [(rank, layout) for rank, layout in enumerate(layouts) if layout is not None]
    if not seen:
        raise ValueError("the loader yielded no usable batch on any rank")
    reference_rank, reference = seen[0]
    for rank, layout in seen[1:]:
        if layout != reference:
            raise DistributedError(
                f"lora-da: ranks {reference_rank} and {rank} found different shared-input groups; "
                "every rank must run the same model"
            )
    if stats.groups:
        return
    for index, (members, d_in, dtype_name) in enumerate(reference):
        dtype = getattr(torch, dtype_name)
        stats.groups.append(
            InputGroup(members=tuple(members), input_factor_sum=torch.zeros(d_in, d_in, dtype=dtype, device=device))
        )
        for name in members:
            d_out = linear_dims(modules[name])[1]
            stats.modules[name] = ModuleStatistics(
                name=name,
                group_index=index,
                grad_sum=torch.zeros(d_out, d_in, dtype=dtype, device=device),
                output_factor_diag_sum=torch.zeros(d_out, dtype=dtype, device=device),
            )
    # keep the module order of the target list, as on the other ranks
    stats.modules = {name: stats.modules[name] for name in modules if name in stats.modules}


def _all_reduce_bucketed(tensors: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """Sum flat tensors over ranks, packing same-dtype neighbours into buckets."""
    reduced: List[Optional[torch.Tensor]] = [None] * len(tensors)
    start = 0
    while start < len(tensors):
        end, size = start, 0
        while end < len(tensors) and tensors[end].dtype == tensors[start].dtype and (
            size == 0 or size + tensors[end].numel() <= BUCKET_ELEMENTS
        ):
            size += tensors[end].numel()
            end += 1
        bucket = torch.cat([t.reshape(-1) for t in tensors[start:end]])
        dist.all_reduce(bucket)
        offset = 0
        for index in range(start, end):
            n = tensors[index].numel()
            reduced[index] = bucket[offset : offset + n]
            offset += n
        start = end
    return reduced  # type: ignore[return-value]


def all_reduce_statistics(stats: KFACStatistics) -> None:
    """Sum the statistics of all ranks in place (Z's upper triangle only)."""
    device = stats.groups[0].input_factor_sum.device
    modules = list(stats.modules.values())
    counts = torch.tensor(
        [stats.num_samples, stats.num_tokens, stats.num_batches, stats.skipped_batches, stats.skipped_samples]
        + [group.num_tokens for group in stats.groups]
        + [module.num_tokens for module in modules],
        dtype=torch.int64,
        device=device,
    )
    dist.all_reduce(counts)
    values = [int(v) for v in counts.tolist()]
    (stats.num_samples, stats.num_tokens, stats.num_batches, stats.skipped_batches, stats.skipped_samples) = values[:5]
    for group, value in zip(stats.groups, values[5 : 5 + len(stats.groups)]):
        group.num_tokens = value
    for module, value in zip(modules, values[5 + len(stats.groups) :]):
        module.num_tokens = value
    upper_masks: Dict[Tuple[int, torch.device], torch.Tensor] = {}
    flat: List[torch.Tensor] = []
    for group in stats.groups:
        z = group.input_factor_sum
        key = (z.shape[0], z.device)
        if key not in upper_masks:
            upper_masks[key] = torch.ones(z.shape, dtype=torch.bool, device=z.device).triu()
        flat.append(z[upper_masks[key]])
    for module_stats in stats.modules.values():
        flat.append(module_stats.output_factor_diag_sum)
        flat.append(module_stats.grad_sum)
    reduced = iter(_all_reduce_bucketed(flat))
    for group in stats.groups:
        z = group.input_factor_sum
        upper = upper_masks[(z.shape[0], z.device)]
        z.zero_()
        z[upper] = next(reduced)
        z.add_(z.triu(1).T)  # mirror the strict upper triangle
    for module_stats in stats.modules.values():
        module_stats.output_factor_diag_sum.copy_(next(reduced).view_as(module_stats.output_factor_diag_sum))
        module_stats.grad_sum.copy_(next(reduced).view_as(module_stats.grad_sum))


# -- solves ---------------------------------------------------------------------------


def assign_groups(stats: KFACStatistics, world_size: int) -> Dict[str, int]:
    """Owner rank of every module: whole input groups (which share one Cholesky
    factor of Z) go to the least-loaded rank, most expensive first.

    Cost model (flops, up to constants): the group's Cholesky and Z⁻¹ (d_in³)
    plus, per member, the dense eigensolve of Ω (d_in³) and Δ (d_in² d_out).
    """
    costs = []
    for index, group in enumerate(stats.groups):
        d_in = group.input_factor_sum.shape[0]
        cost = d_in**3
        for name in group.members:
            d_out = stats.modules[name].grad_sum.shape[0]
            cost += d_in**3 + d_in * d_in * d_out
        costs.append((cost, index))
    load = [0] * world_size
    owners: Dict[str, int] = {}
    for cost, index in sorted(costs, key=lambda item: (-item[0], item[1])):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        load[rank] += cost
        for name in stats.groups[index].members:
            owners[name] = rank
    return owners


def _float64_fields(m: ModuleInit) -> torch.Tensor:
    scalars = torch.tensor([m.sigma, m.variance_scale, m.damping], dtype=torch.float64, device=m.eigenvalues.device)
    return torch.cat([m.eigenvalues.to(torch.float64), scalars])


def gather_module_inits(
    mine: Dict[str, ModuleInit],
    owners: Dict[str, int],
    stats: KFACStatistics,
    lora_rank: int,
    device: torch.device,
    gather_to: Optional[int] = None,
) -> Dict[str, ModuleInit]:
    """Share each rank's solved modules with every rank (or with ``gather_to`` only).

    Per owner, factors travel as one float32 buffer and eigenvalues/scalars as one
    float64 buffer, whose shapes every rank knows from the statistics.
    """
    world_size, rank, r = dist.get_world_size(), dist.get_rank(), lora_rank
    result: Dict[str, ModuleInit] = {}
    for owner in range(world_size):
        names = [name for name in stats.modules if owners[name] == owner]
        if not names:
            continue
        receives = gather_to is None or rank == gather_to
        if gather_to is not None and owner == gather_to:
            if rank == owner:
                result.update({name: mine[name] for name in names})
            continue
        shapes = []
        for name in names:
            d_out, d_in = stats.modules[name].grad_sum.shape
            shapes.append((d_in, d_out))
        float_size = sum(r * d_in + d_out * r for d_in, d_out in shapes)
        double_size = len(names) * (r + 3)
        if rank == owner:
            factors = torch.cat(
                [torch.cat([mine[n].lora_A.reshape(-1), mine[n].lora_B.reshape(-1)]) for n in names]
            ).to(device)
            doubles = torch.cat([_float64_fields(mine[n]) for n in names]).to(device)
        else:
            factors = torch.empty(float_size, dtype=torch.float32, device=device)
            doubles = torch.empty(double_size, dtype=torch.float64, device=device)
        if gather_to is None:
            dist.broadcast(factors, src=owner)
            dist.broadcast(doubles, src=owner)
        elif rank == owner:
            dist.send(factors, dst=gather_to)
            dist.send(doubles, dst=gather_to)
        elif rank == gather_to:
            dist.recv(factors, src=owner)
            dist.recv(doubles, src=owner)
        if rank == owner:
            result.update({name: mine[name] for name in names})
            continue
        if not receives:
            continue
        f_offset = d_offset = 0
        for name, (d_in, d_out) in zip(names, shapes):
            lora_A = factors[f_offset : f_offset + r * d_in].view(r, d_in).clone()
            f_offset += r * d_in
            lora_B = factors[f_offset : f_offset + d_out * r].view(d_out, r).clone()
            f_offset += d_out * r
            fields = doubles[d_offset : d_offset + r + 3]
            d_offset += r + 3
            group = stats.groups[stats.modules[name].group_index].members
            result[name] = ModuleInit(
                name=name,
                lora_A=lora_A,
                lora_B=lora_B,
                eigenvalues=fields[:r].clone(),
                sigma=float(fields[r]),
                variance_scale=float(fields[r + 1]),
                damping=float(fields[r + 2]),
                input_group=group,
            )
    return {name: result[name] for name in stats.modules if name in result}
