"""Scale out on ``torch.distributed``: sharded statistics, distributed solves.

When a process group is initialized, :func:`lora_da.initialize` runs on every
rank with that rank's share of the data (e.g. a ``DistributedSampler`` loader):

1. each rank runs the statistics pass on its own batches (no rank sees another
   rank's activations);
2. the ranks agree on the shared-input groups (a rank whose share was empty
   takes them from the others) and all-reduce the sums — ``Z``'s upper
   triangle only, ``y``, ``G`` and the token/sample counts — in buckets;
3. input groups are split between ranks by estimated solve cost (longest
   processing time first), each rank solves its share;
4. every rank owning results broadcasts them (or sends them to ``gather_to``).

A rank that raises during a phase does not leave the others waiting in the
next collective: every phase ends with an exchange of status, after which all
ranks raise the same :class:`DistributedError` naming the failing rank.

Before any of it, :func:`agree` checks that every rank was called alike (the
arguments, the target modules, the passes ``max_memory`` plans) — a rank with
another ``rank`` or ``gather_to`` would otherwise abort or hang in a later
collective. When the model's forward passes are themselves collectives (FSDP2
``fully_shard``, DTensor parameters), every rank must read the same number of
batches: :func:`agree` compares the loaders' ``len()``, and :class:`AgreedBatches`
has the ranks agree before each batch, so that a loader running out early makes
every rank raise instead of one rank aborting in the model's all-gather.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from .layers import linear_dims
from .module_init import ModuleInit
from .statistics import InputGroup, KFACStatistics, ModuleStatistics

if TYPE_CHECKING:
    from .config import LoraDAConfig

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
    _raise_failures(phase, messages, error)
    return result


def _raise_failures(phase: str, messages: Sequence[Optional[str]], error: Optional[BaseException]) -> None:
    """Raise the same error on every rank when any rank's message is not ``None``: a
    :class:`DistributedError` every rank raised alike as it is, else one naming the first failing rank."""
    failed = [(rank, text) for rank, text in enumerate(messages) if text is not None]
    if not failed:
        return
    if isinstance(error, DistributedError) and len(failed) == len(messages) and len(set(messages)) == 1:
        raise error  # already the same on every rank (e.g. from AgreedBatches)
    rank, text = failed[0]
    raise DistributedError(f"lora-da: rank {rank} failed during {phase}: {text}") from error


# -- agreement on the arguments ---------------------------------------------------------------


def forward_is_collective(model: nn.Module) -> bool:
    """True when the model's forward passes run collectives of their own: FSDP2 (``fully_shard``)
    or FSDP1 modules, or parameters that are DTensors (e.g. tensor parallel)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        DTensor = ()  # type: ignore[assignment,misc]
    fsdp_types: Tuple[type, ...] = ()
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

        fsdp_types = (FSDPModule, FullyShardedDataParallel)
    except ImportError:  # pragma: no cover - older torch
        pass
    if fsdp_types and any(isinstance(module, fsdp_types) for module in model.modules()):
        return True
    return bool(DTensor) and any(isinstance(parameter, DTensor) for parameter in model.parameters())


def _arguments(config: "LoraDAConfig") -> List[Tuple[str, Any]]:
    """The arguments every rank must share, as picklable ``(name, value)`` pairs."""
    token_mask = config.token_mask
    if not (token_mask is None or isinstance(token_mask, str)):
        token_mask = "a callable"
    options = config.options
    options = tuple(sorted(dataclasses.asdict(options).items())) if dataclasses.is_dataclass(options) else repr(options)
    return [
        ("method", config.method),
        ("rank", config.rank),
        ("alpha", config.alpha),
        ("beta", config.beta),
        ("gamma", config.gamma),
        ("damping", config.damping),
        ("train_size", config.train_size),
        ("token_mask", token_mask),
        ("loss_fn", "the default" if config.loss_fn is None else "a custom loss_fn"),
        ("solver", config.solver),
        ("seed", config.seed),
        ("preserve_output", config.preserve_output),
        ("gather_to", config.gather_to),
        ("method_options", options),
    ]


def _batch_count(loader: Any, max_batches: Optional[int]) -> Optional[int]:
    """The batches the statistics pass will read (``len(loader)`` capped by ``max_batches``); ``None`` unknown."""
    try:
        count = len(loader)
    except TypeError:
        return None
    return count if max_batches is None else min(count, max_batches)


def _plan_summary(
    config: "LoraDAConfig", model: nn.Module, loader: Any, targets: Dict[str, nn.Module], passes: Sequence[Dict]
) -> List[Tuple[str, Any]]:
    """What ``prepare`` found, as ``(name, value)`` pairs every rank must share (the last one,
    the batch count under collective forward passes, is compared where known)."""
    description = repr([(name, linear_dims(module)) for name, module in targets.items()]).encode()
    collective = forward_is_collective(model)
    from .methods import get_method

    reads_data = get_method(config.method).needs_data and loader is not None
    return [
        ("target modules", f"{len(targets)} modules (sha256 {hashlib.sha256(description).hexdigest()[:12]})"),
        ("max_memory (the modules per pass it plans)", [len(group) for group in passes]),
        ("model", "FSDP2 / DTensor (collective forward passes)" if collective else "local forward passes"),
        # uneven shares are fine with local forward passes, not with collective ones
        ("max_batches (under FSDP2)", config.max_batches if collective else None),
        ("batches", _batch_count(loader, config.max_batches) if collective and reads_data else None),
    ]


def _by_value(values: Sequence[Any]) -> str:
    """``'4 on rank 0, 5 on ranks 1, 2'``: each distinct value with the ranks that hold it."""
    groups: List[Tuple[Any, List[int]]] = []
    for rank, value in enumerate(values):
        for seen, ranks in groups:
            if seen == value:
                ranks.append(rank)
                break
        else:
            groups.append((value, [rank]))
    parts = []
    for value, ranks in groups:
        text = repr(value)
        text = text if len(text) <= 200 else text[:197] + "..."
        parts.append(f"{text} on rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}")
    return ", ".join(parts)


def _differences(per_rank: Sequence[Sequence[Tuple[str, Any]]]) -> List[str]:
    return [
        f"{name}: {_by_value([pairs[index][1] for pairs in per_rank])}"
        for index, (name, _) in enumerate(per_rank[0])
        if any(pairs[index][1] != per_rank[0][index][1] for pairs in per_rank)
    ]


def agree(
    config: "LoraDAConfig",
    model: nn.Module,
    loader: Any,
    prepare: Callable[[], Tuple[Dict[str, nn.Module], List[Dict[str, nn.Module]]]],
) -> Tuple[Dict[str, nn.Module], List[Dict[str, nn.Module]]]:
    """Run ``prepare`` (find the targets, check them, plan the passes) on every rank and check,
    in one small collective, that every rank was called alike; return what ``prepare`` returned.

    Every rank raises the same :class:`DistributedError` when the ranks differ in an argument
    (``rank``, ``gather_to``, ``train_size``, ...), in the target modules or in the passes
    ``max_memory`` plans (naming it and each rank's value), when ``gather_to`` is not a rank of
    the group, or when the model's forward passes are collectives (FSDP2) and the loaders'
    lengths differ. When ``prepare`` raised on every rank alike, its error is re-raised as is;
    when it raised on some ranks only, a :class:`DistributedError` names the first.
    """
    world_size = dist.get_world_size()
    error: Optional[BaseException] = None
    summary: Optional[List[Tuple[str, Any]]] = None
    prepared = None
    try:
        prepared = prepare()
        summary = _plan_summary(config, model, loader, *prepared)
    except BaseException as caught:  # noqa: BLE001 - raised below, on every rank
        error = caught
    message = None if error is None else f"{type(error).__name__}: {error}"
    gathered: List[Any] = [None] * world_size
    dist.all_gather_object(gathered, (_arguments(config), message, summary))
    differences = _differences([arguments for arguments, _, _ in gathered])
    if differences:
        raise DistributedError(
            "lora-da: every rank must call initialize with the same arguments, but they differ: "
            + "; ".join(differences)
        ) from error
    messages = [text for _, text, _ in gathered]
    if error is not None and len(set(messages)) == 1:
        raise error  # the same failure on every rank: as on one process
    _raise_failures("the argument checks", messages, error)
    summaries = [summary for _, _, summary in gathered]
    differences = _differences([pairs[:-1] for pairs in summaries])
    if differences:
        raise DistributedError(
            "lora-da: every rank must run the same model and plan, but they differ: " + "; ".join(differences)
        )
    counts = [pairs[-1][1] for pairs in summaries]
    if len({count for count in counts if count is not None}) > 1:
        raise DistributedError(
            "lora-da: the model's forward passes are collectives (FSDP2 / DTensor parameters), so every rank "
            f"must read the same number of batches, but the loaders differ: {_by_value(counts)} "
            "(len(loader), capped by max_batches; None: no len())"
        )
    if config.gather_to is not None and config.gather_to >= world_size:
        raise DistributedError(
            f"lora-da: gather_to={config.gather_to} is not a rank of this process group "
            f"(ranks 0..{world_size - 1})"
        )
    assert prepared is not None
    return prepared


class AgreedBatches:
    """A loader whose ranks agree before each batch, for models whose forward passes are
    collectives (FSDP2): when one rank's loader runs out (or raises) while another's goes on,
    no rank starts another forward pass. Ranks that ran out alongside others that did not all
    raise the same :class:`DistributedError`; when a rank's loader raises, it raises that error
    and the others stop, so that :func:`run_agreeing` makes every rank raise it.

    One tiny all-gather per batch (the model itself runs several per layer). Stops after
    ``max_batches`` without asking the others, as the statistics pass does.
    """

    def __init__(self, loader: Any, max_batches: Optional[int], device: torch.device) -> None:
        self.loader = loader
        self.max_batches = max_batches
        self.device = device

    def __len__(self) -> int:
        return len(self.loader)  # TypeError when the loader has none, as before

    def __iter__(self) -> Iterator[Any]:
        world_size = dist.get_world_size()
        iterator: Optional[Iterator[Any]] = None
        index = 0
        while self.max_batches is None or index < self.max_batches:
            status, batch, error = 1, None, None  # 1: a batch, 0: ran out, -1: the loader raised
            try:
                if iterator is None:
                    iterator = iter(self.loader)
                batch = next(iterator)
            except StopIteration:
                status = 0
            except Exception as caught:  # noqa: BLE001 - re-raised below, after the others know
                status, error = -1, caught
            flags = [torch.zeros(1, dtype=torch.int64, device=self.device) for _ in range(world_size)]
            dist.all_gather(flags, torch.tensor([status], dtype=torch.int64, device=self.device))
            statuses = [int(flag.item()) for flag in flags]
            if error is not None:
                raise error
            if -1 in statuses or all(value == 0 for value in statuses):
                return  # done, or another rank's loader raised: run_agreeing raises its error here too
            if 0 in statuses:
                ended = [rank for rank, value in enumerate(statuses) if value == 0]
                going = [rank for rank, value in enumerate(statuses) if value == 1]
                raise DistributedError(
                    "lora-da: the model's forward passes are collectives (FSDP2 / DTensor parameters), so every "
                    f"rank must read the same number of batches, but the loader of rank(s) "
                    f"{', '.join(map(str, ended))} ended after {index} batches while that of rank(s) "
                    f"{', '.join(map(str, going))} had more"
                )
            yield batch
            index += 1


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
    counts = torch.tensor(
        [stats.num_samples, stats.num_tokens, stats.num_batches, stats.skipped_batches, stats.skipped_samples],
        dtype=torch.int64,
        device=device,
    )
    dist.all_reduce(counts)
    (stats.num_samples, stats.num_tokens, stats.num_batches, stats.skipped_batches, stats.skipped_samples) = (
        int(v) for v in counts.tolist()
    )
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
