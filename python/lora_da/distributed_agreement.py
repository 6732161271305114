"""Under ``torch.distributed``: every rank checks that all were called alike.

A rank with another ``rank`` or ``gather_to`` would otherwise abort or hang in a
later collective. :func:`agree` runs the driver's start-up steps on every rank and
compares, in one small collective, the arguments, the target modules and the
passes ``max_memory`` plans; any difference makes every rank raise the same
:class:`~lora_da.distributed.DistributedError` naming it and each rank's value.
When the model's forward passes are themselves collectives (FSDP2
``fully_shard``, DTensor parameters), every rank must read the same number of
batches: :func:`agree` compares the loaders' ``len()``, and :class:`AgreedBatches`
has the ranks agree before each batch, so that a loader running out early makes
every rank raise instead of one rank aborting in the model's all-gather.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn

from .config import LoraDAConfig
from .distributed import DistributedError, raise_failures
from .layers import linear_dims
from .methods import get_method


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


def _arguments(config: LoraDAConfig) -> List[Tuple[str, Any]]:
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
    config: LoraDAConfig, model: nn.Module, loader: Any, targets: Dict[str, nn.Module], passes: Sequence[Dict]
) -> List[Tuple[str, Any]]:
    """What ``prepare`` found, as ``(name, value)`` pairs every rank must share (the last one,
    the batch count under collective forward passes, is compared where known)."""
    description = repr([(name, linear_dims(module)) for name, module in targets.items()]).encode()
    collective = forward_is_collective(model)
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
    config: LoraDAConfig,
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
    raise_failures("the argument checks", messages, error)
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
