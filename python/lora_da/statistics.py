"""One hooked forward+backward per batch accumulates the K-FAC statistics.

For every target module (docs/math.md §2; sums before normalization):

* ``grad_sum``  = Σ_samples ∇_W ℓ_sample  (→ ``G = grad_sum / n``)
* ``output_factor_diag_sum`` = Σ_t m_t g_t ⊙ g_t  (→ ``y = ... / |T|``)

and for every group of modules that receive the *same input tensor*:

* ``input_factor_sum`` = Σ_t m_t a_t a_tᵀ  (→ ``Z = ... / |T| + λI``)

How: a forward hook on each target module records its input and adds a zero
"anchor" scalar to its output; a tensor hook on that output receives the output
gradient ``g`` during ``torch.autograd.grad(loss, anchor)``. All parameters have
``requires_grad`` switched off for the pass, so no weight gradient is computed
and no ``param.grad`` is allocated; the anchor makes every target output part
of the graph even when nothing upstream requires grad. Shared inputs are
detected from the tensors themselves (same storage, shape, strides, version).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn
from tqdm.auto import tqdm

# ``kernels/`` sits at the repository's top level (the design keeps the Triton kernels
# there); CMakeLists.txt installs it into the wheel as the subpackage ``lora_da.kernels``.
from .checkpoint import StatisticsCheckpoint, statistics_fingerprint
from .kernels.dispatch import TORCH_BACKEND, StatisticsBackend, select_backend
from .losses import (
    IGNORE_INDEX,
    as_causal_lm_batch,
    causal_lm_per_sample_loss,
    model_inputs,
    move_to_device,
    token_mask_for,
)
from .model_state import preserved_model_state
from .layers import linear_dims

logger = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, Any], torch.Tensor]


@dataclass
class InputGroup:
    """Modules fed the same input tensor, and their shared ``Σ m a aᵀ``."""

    members: Tuple[str, ...]
    input_factor_sum: torch.Tensor


@dataclass
class ModuleStatistics:
    """Accumulated sums of one target module."""

    name: str
    group_index: int
    grad_sum: Optional[torch.Tensor]  # d_out x d_in (None after a forward-only pass)
    output_factor_diag_sum: Optional[torch.Tensor]  # d_out (None after a forward-only pass)


@dataclass
class KFACStatistics:
    """The statistics pass's result; the accessors apply the normalizations of docs/math.md §2."""

    modules: Dict[str, ModuleStatistics]
    groups: List[InputGroup]
    num_samples: int = 0
    num_tokens: int = 0
    num_batches: int = 0
    skipped_batches: int = 0
    skipped_samples: int = 0
    backend: str = "torch"  # which implementation accumulated the sums
    accumulate_seconds: float = 0.0  # time spent accumulating Z, y and G inside the pass (not persisted)

    def nbytes(self) -> int:
        """Bytes held by the sums (Z per input group, G and y per module)."""
        tensors = [g.input_factor_sum for g in self.groups]
        tensors += [t for m in self.modules.values() for t in (m.grad_sum, m.output_factor_diag_sum) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)
    has_gradients: bool = True  # False after a forward-only pass (only Z)

    def _require_gradients(self, name: str) -> None:
        if not self.has_gradients or self.modules[name].grad_sum is None:
            raise ValueError(
                f"these statistics come from a forward-only pass: module '{name}' has no gradient G or output factor y"
            )

    def gradient(self, name: str) -> torch.Tensor:
        """``G = (1/n) Σ_samples ∇_W ℓ_sample`` (``d_out x d_in``)."""
        self._require_gradients(name)
        return self.modules[name].grad_sum / self.num_samples

    def input_factor(self, name: str) -> torch.Tensor:
        """``(1/|T|) Σ_t a_t a_tᵀ`` of the module's input group, *without* damping."""
        group = self.groups[self.modules[name].group_index]
        return group.input_factor_sum / self.num_tokens

    def output_factor_diag(self, name: str) -> torch.Tensor:
        """``y = (1/|T|) Σ_t g_t ⊙ g_t``, *without* damping."""
        self._require_gradients(name)
        return self.modules[name].output_factor_diag_sum / self.num_tokens

    def check_totals(self) -> None:
        """Raise ``ValueError`` when no batch, token or sample was seen; then :meth:`check_finite`."""
        if self.num_batches == 0:
            raise ValueError("the loader yielded no batches")
        if self.num_tokens == 0:
            raise ValueError(
                f"every batch's token mask was empty ({self.skipped_batches} batches skipped); "
                "check token_mask and the batches' masks/labels"
            )
        if self.num_samples == 0:
            raise ValueError("no sample carried any loss (all labels are -100?)")
        self.check_finite()

    def check_finite(self) -> None:
        """Raise ``FloatingPointError`` naming the first module with a NaN/Inf statistic."""
        for group in self.groups:
            if not torch.isfinite(group.input_factor_sum).all():
                raise FloatingPointError(
                    f"input factor Z of module '{group.members[0]}' contains NaN/Inf "
                    f"(input shared by {list(group.members)})"
                )
        for stats in self.modules.values():
            if stats.grad_sum is None:  # forward-only pass
                continue
            if not torch.isfinite(stats.output_factor_diag_sum).all():
                raise FloatingPointError(f"output factor y of module '{stats.name}' contains NaN/Inf")
            if not torch.isfinite(stats.grad_sum).all():
                raise FloatingPointError(f"gradient G of module '{stats.name}' contains NaN/Inf")


def _accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 models accumulate in fp64; everything else in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tensor_key(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, t.device, t._version)


class _AccumulateClock:
    """Time spent in the statistics accumulation inside the pass.

    On CPU the work is synchronous: wall time around each call. On CUDA a pair
    of events per call, read once at the end of the pass (one sync, no host
    sync inside the pass).
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.seconds = 0.0
        self.events: List[tuple] = []

    @contextlib.contextmanager
    def measure(self):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.events.append((start, end))
        else:
            begin = time.perf_counter()
            yield
            self.seconds += time.perf_counter() - begin

    def total(self) -> float:
        if self.events:
            torch.cuda.synchronize()
            self.seconds += sum(start.elapsed_time(end) for start, end in self.events) / 1000.0
            self.events.clear()
        return self.seconds


@dataclass
class _LiveInput:
    """One input tensor seen in the current batch, until its members' gradients arrive."""

    rows: Optional[torch.Tensor]
    group_index: int
    members: List[str] = field(default_factory=list)
    pending: int = 0


class _Collector:
    def __init__(
        self,
        modules: Dict[str, nn.Linear],
        backend: StatisticsBackend = TORCH_BACKEND,
        forward_only: bool = False,
        device: Optional[torch.device] = None,
    ):
        self.modules = modules
        self.backend = backend
        self.clock = _AccumulateClock(device or torch.device("cpu"))
        self.forward_only = forward_only  # only Z: no anchor, no output-gradient hooks
        self.stats = KFACStatistics(modules={}, groups=[], has_gradients=not forward_only)
        self.group_of: Dict[str, int] = {}
        self._reset_batch()

    # -- per-batch state ------------------------------------------------------------
    def _reset_batch(self) -> None:
        self.token_weights: Optional[torch.Tensor] = None
        self.expected_rows: Optional[int] = None
        self.anchor: Optional[torch.Tensor] = None
        self.active = False
        self.live_by_key: Dict[tuple, _LiveInput] = {}
        self.live_by_module: Dict[str, _LiveInput] = {}
        self.gradients_seen: set = set()
        self.batch_rows: Optional[int] = None

    def start_batch(
        self, token_weights: Optional[torch.Tensor], device: torch.device, all_tokens_kept: bool = False
    ) -> None:
        """``all_tokens_kept``: the mask keeps every token, so the sums skip the
        multiplication by the weights (the row count is still checked)."""
        self._reset_batch()
        self.expected_rows = None if token_weights is None else token_weights.numel()
        self.token_weights = None if all_tokens_kept else token_weights
        self.active = True
        if not self.forward_only:
            self.anchor = torch.zeros((), device=device, requires_grad=True)

    def check_batch_finite(self, batch_index: int) -> None:
        """Raise on NaN/Inf that entered the sums in this batch, naming module and batch.

        A NaN/Inf input shows on Z's diagonal (Σ m a²), a NaN/Inf output gradient
        on y (Σ m g²); fp16/bf16 overflow shows as Inf. One host sync per batch.
        """
        groups, modules = self.stats.groups, list(self.stats.modules.values())
        flags = [torch.isfinite(torch.diagonal(g.input_factor_sum)).all() for g in groups]
        modules = [m for m in modules if m.output_factor_diag_sum is not None]
        flags += [torch.isfinite(m.output_factor_diag_sum).all() for m in modules]
        flags = torch.stack(flags)
        if bool(flags.all()):
            return
        first = int((~flags).nonzero()[0])
        if first < len(groups):
            members = groups[first].members
            raise FloatingPointError(
                f"NaN/Inf in the input of module '{members[0]}' (shared by {list(members)}) in batch {batch_index}"
            )
        raise FloatingPointError(
            f"NaN/Inf in the output gradient of module '{modules[first - len(groups)].name}' in batch {batch_index}"
        )

    def state(self) -> dict:
        """The sums and counts, for a checkpoint."""
        st = self.stats
        return {
            "groups": [(g.members, g.input_factor_sum) for g in st.groups],
            "modules": [(m.name, m.group_index, m.grad_sum, m.output_factor_diag_sum) for m in st.modules.values()],
            "counts": (st.num_samples, st.num_tokens, st.num_batches, st.skipped_batches, st.skipped_samples),
            "forward_only": self.forward_only,
        }

    def restore(self, state: dict) -> None:
        st = self.stats
        st.groups = [InputGroup(members=tuple(members), input_factor_sum=z) for members, z in state["groups"]]
        st.modules = {
            name: ModuleStatistics(name=name, group_index=index, grad_sum=g, output_factor_diag_sum=y)
            for name, index, g, y in state["modules"]
        }
        self.group_of = {name: index for name, index, _, _ in state["modules"]}
        (st.num_samples, st.num_tokens, st.num_batches, st.skipped_batches, st.skipped_samples) = state["counts"]
        self.forward_only = bool(state.get("forward_only", False))
        st.has_gradients = not self.forward_only

    def end_batch(self, batch_index: int) -> None:
        for name in self.modules:
            if name not in self.live_by_module:
                raise RuntimeError(
                    f"target module '{name}' was not called in batch {batch_index}; "
                    "every target module must run once per forward pass"
                )
            if name not in self.gradients_seen and not self.forward_only:
                raise RuntimeError(
                    f"the loss does not depend on the output of target module '{name}' "
                    f"(no output gradient in batch {batch_index})"
                )
        for live in self.live_by_key.values():
            members = set(live.members)
            expected = set(self.stats.groups[live.group_index].members)
            if members != expected:
                raise RuntimeError(
                    f"modules {sorted(members)} shared an input in batch {batch_index}, "
                    f"but {sorted(expected)} did in the first batch; input sharing must not change between batches"
                )
        self._reset_batch()

    # -- hooks ------------------------------------------------------------------------
    def forward_hook(self, name: str):
        def hook(module: nn.Linear, args: tuple, kwargs: dict, output: torch.Tensor):
            return self._on_forward(name, module, args, kwargs, output)

        return hook

    def _on_forward(self, name, module, args, kwargs, output):
        if not self.active:  # a forward outside our pass (should not happen)
            return None
        d_in, d_out = linear_dims(module)
        if name in self.live_by_module:
            raise RuntimeError(
                f"target module '{name}' was called more than once in one forward pass "
                "(weight sharing or activation checkpointing is not supported)"
            )
        inputs = args[0] if args else kwargs.get("input")
        if not isinstance(inputs, torch.Tensor) or inputs.shape[-1] != d_in:
            shape = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__
            raise ValueError(f"module '{name}' got input {shape}, expected last dimension {d_in}")
        if not inputs.is_floating_point():
            raise TypeError(f"module '{name}' got a {inputs.dtype} input; LoRA-DA needs floating-point activations")
        rows = inputs.numel() // d_in
        if self.expected_rows is not None and rows != self.expected_rows:
            raise ValueError(
                f"module '{name}' got input of shape {tuple(inputs.shape)} ({rows} tokens) but the "
                f"token mask has {self.expected_rows} entries; pass token_mask=None or a "
                "callable that matches the module's inputs"
            )
        if self.batch_rows is None:
            self.batch_rows = rows

        key = _tensor_key(inputs)
        live = self.live_by_key.get(key)
        if live is None:
            group_index = self.group_of.get(name)
            flat = inputs.detach().reshape(-1, d_in)
            if group_index is None:  # first batch: a new group starts with this module
                group_index = len(self.stats.groups)
                dtype = _accumulator_dtype(inputs.dtype)
                self.stats.groups.append(
                    InputGroup(
                        members=(),
                        input_factor_sum=torch.zeros(
                            d_in, d_in, dtype=dtype, device=inputs.device
                        ),
                    )
                )
            with self.clock.measure():
                self.backend.accumulate_input_factor(
                    self.stats.groups[group_index].input_factor_sum, flat, self.token_weights
                )
            live = _LiveInput(rows=flat, group_index=group_index)
            self.live_by_key[key] = live
        if name not in self.group_of:  # first batch: join the group of this input
            self.group_of[name] = live.group_index
            group = self.stats.groups[live.group_index]
            group.members = group.members + (name,)
            dtype = group.input_factor_sum.dtype
            with_gradients = not self.forward_only
            self.stats.modules[name] = ModuleStatistics(
                name=name,
                group_index=live.group_index,
                grad_sum=torch.zeros(d_out, d_in, dtype=dtype, device=inputs.device) if with_gradients else None,
                output_factor_diag_sum=torch.zeros(d_out, dtype=dtype, device=inputs.device) if with_gradients else None,
            )
        live.members.append(name)
        self.live_by_module[name] = live
        if self.forward_only:  # Z only; `live` keeps the input alive until the batch ends, so
            return None  # that its storage is not reused by another input (sharing is detected by address)
        live.pending += 1

        anchored = output + self.anchor.to(output.dtype)
        anchored.register_hook(self._gradient_hook(name, d_out))
        return anchored

    def _gradient_hook(self, name: str, out_features: int):
        def hook(grad: torch.Tensor) -> None:
            live = self.live_by_module[name]
            stats = self.stats.modules[name]
            with self.clock.measure():
                self.backend.accumulate_output_statistics(
                    stats.output_factor_diag_sum,
                    stats.grad_sum,
                    grad.reshape(-1, out_features),
                    live.rows,
                    self.token_weights,
                )
            self.gradients_seen.add(name)
            live.pending -= 1
            if live.pending == 0:
                live.rows = None  # release the activation as soon as its group is done

        return hook


def model_device(model: nn.Module) -> torch.device:
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


def model_dtype(model: nn.Module) -> Optional[torch.dtype]:
    """The dtype of the model's first floating-point parameter (``None`` when it has none)."""
    for parameter in model.parameters():
        if parameter.is_floating_point():
            return parameter.dtype
    return None


def collect_statistics(
    model: nn.Module,
    loader: Any,
    modules: Dict[str, nn.Linear],
    *,
    token_mask: Any = "attention",
    loss_fn: Optional[LossFn] = None,
    max_batches: Optional[int] = None,
    progress: bool = False,
    check_totals: bool = True,
    stats_backend: str = "auto",
    stats_checkpoint: Optional[str] = None,
    checkpoint_every: int = 50,
    forward_only: bool = False,
) -> KFACStatistics:
    """Run one hooked forward+backward per batch of ``loader`` and return the sums.

    ``loss_fn(model, batch)`` must return the per-sample losses of the batch (a
    1-D tensor, one entry per sample that counts); their sum is differentiated.
    The default is each sample's mean next-token loss (:func:`causal_lm_per_sample_loss`).
    The model runs in eval mode (no dropout); it is left exactly as found.
    ``check_totals=False`` skips :meth:`KFACStatistics.check_totals` (for a rank
    whose share of a distributed loader may be empty).
    ``stats_backend``: ``"auto"``, ``"torch"`` or ``"triton"`` (see
    :func:`lora_da.kernels.dispatch.select_backend`); ``stats.backend`` says which ran.
    ``stats_checkpoint``/``checkpoint_every``: save the sums atomically every K
    batches and resume from them (see :mod:`lora_da.checkpoint`).
    NaN/Inf entering the sums is reported after the batch that brought it.

    ``forward_only=True`` (methods that need only ``Z``, e.g. CNTLoRA): one
    forward per batch under ``torch.no_grad()``, no backward, no output-gradient
    hooks; ``G`` and ``y`` are ``None`` and ``stats.has_gradients`` is False. With
    the default loss the model is called on the batch without computing the
    loss; a custom ``loss_fn`` is called under ``torch.no_grad()`` only to run the
    forward (its per-sample losses count the samples). The checkpoint
    fingerprint does not depend on this flag: a forward-only pass reads a
    checkpoint of a full pass (and, if it is unfinished, goes on as a full pass
    so that the file stays complete); a full pass refuses a forward-only one.
    """
    loss_fn = loss_fn or causal_lm_per_sample_loss
    device = model_device(model)
    backend = select_backend(device, stats_backend, model_dtype(model))
    collector = _Collector(modules, backend, forward_only=forward_only, device=device)
    stats = collector.stats
    stats.backend = backend.name
    try:
        total = len(loader)
    except TypeError:
        total = None
    if max_batches is not None and total is not None:
        total = min(total, max_batches)
    checkpoint = None
    resume_from = 0
    if stats_checkpoint is not None:
        fingerprint = statistics_fingerprint(model, modules, token_mask, loss_fn, backend.name)
        checkpoint = StatisticsCheckpoint(stats_checkpoint, checkpoint_every, fingerprint)
        saved = checkpoint.load(device)
        if saved is not None:
            saved_forward_only = bool(saved.get("forward_only", False))
            if saved_forward_only and not forward_only:
                raise ValueError(
                    f"statistics checkpoint '{stats_checkpoint}' holds a forward-only pass (Z only, no G or y); "
                    "this method needs gradients: delete it or pass another stats_checkpoint path"
                )
            if forward_only and not saved_forward_only:
                logger.info("%s holds a full pass: using it (any remaining batches run forward+backward)", stats_checkpoint)
            collector.restore(saved)
            forward_only = collector.forward_only
            resume_from = stats.num_batches
            logger.info("resuming the statistics pass after batch %d from %s", resume_from, stats_checkpoint)

    with preserved_model_state(model) as handles, torch.set_grad_enabled(not forward_only):
        model.eval()
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        for name, module in modules.items():
            handles.append(module.register_forward_hook(collector.forward_hook(name), with_kwargs=True))

        bar = tqdm(total=total, desc="lora-da statistics", unit="batch", disable=not progress, leave=False)
        try:
            for batch_index, batch in enumerate(loader):
                if max_batches is not None and batch_index >= max_batches:
                    break
                bar.update(1)
                if batch_index < resume_from:
                    continue  # already in the checkpoint
                stats.num_batches += 1
                batch = move_to_device(batch, device)
                if loss_fn is causal_lm_per_sample_loss:
                    batch = as_causal_lm_batch(batch)
                mask = token_mask_for(batch, token_mask)
                weights = None
                if mask is not None:
                    weights = mask.reshape(-1).to(device=device)
                    # one host sync per batch: the kept tokens, and whether every weight is 1
                    counts = torch.stack([weights.sum(dtype=torch.float64), (weights != 1).sum(dtype=torch.float64)])
                    batch_tokens, weights_not_one = (int(v) for v in counts.tolist())
                    if batch_tokens == 0:
                        stats.skipped_batches += 1
                        logger.info("batch %d: the token mask keeps no token; skipped", batch_index)
                        _maybe_checkpoint(checkpoint, collector)
                        continue
                collector.start_batch(weights, device, all_tokens_kept=weights is not None and weights_not_one == 0)
                if forward_only:
                    samples, skipped = _forward_only_batch(model, batch, loss_fn)
                    if weights is None:
                        batch_tokens = collector.batch_rows
                    collector.end_batch(batch_index)
                    collector.check_batch_finite(batch_index)
                    stats.num_tokens += batch_tokens
                    stats.num_samples += samples
                    stats.skipped_samples += skipped
                    _maybe_checkpoint(checkpoint, collector)
                    continue
                losses = loss_fn(model, batch)
                if not isinstance(losses, torch.Tensor) or losses.dim() > 1:
                    raise TypeError(
                        "loss_fn must return a 1-D tensor of per-sample losses, got "
                        + (f"shape {tuple(losses.shape)}" if isinstance(losses, torch.Tensor) else type(losses).__name__)
                    )
                losses = losses.reshape(-1)
                total_loss = losses.sum()
                if not torch.isfinite(total_loss).item():
                    raise FloatingPointError(f"the loss of batch {batch_index} is {total_loss.item()}")
                if not total_loss.requires_grad:
                    raise RuntimeError("the loss does not depend on any target module's output")
                torch.autograd.grad(total_loss, collector.anchor)
                if weights is None:
                    batch_tokens = collector.batch_rows
                collector.end_batch(batch_index)
                collector.check_batch_finite(batch_index)
                stats.num_tokens += batch_tokens
                stats.num_samples += losses.numel()
                stats.skipped_samples += _batch_size(batch) - losses.numel() if loss_fn is causal_lm_per_sample_loss else 0
                elapsed = bar.format_dict.get("elapsed") or 0.0
                bar.set_postfix(tokens=stats.num_tokens, tok_per_s=f"{stats.num_tokens / max(elapsed, 1e-9):.0f}")
                _maybe_checkpoint(checkpoint, collector)
        finally:
            bar.close()
            collector._reset_batch()

    if checkpoint is not None and stats.num_batches > resume_from:
        checkpoint.save(collector.state())  # before finalize: the state of a pass in progress
    with collector.clock.measure():
        for group in stats.groups:  # e.g. mirror the Triton kernel's upper triangle, once per pass
            backend.finalize_input_factor(group.input_factor_sum)
    stats.accumulate_seconds = collector.clock.total()
    if check_totals:
        stats.check_totals()
    return stats


def _maybe_checkpoint(checkpoint: Optional[StatisticsCheckpoint], collector: _Collector) -> None:
    if checkpoint is not None and collector.stats.num_batches % checkpoint.every == 0:
        checkpoint.save(collector.state())


def _forward_only_batch(model: nn.Module, batch: Any, loss_fn: LossFn) -> Tuple[int, int]:
    """One forward (grad disabled by the caller); returns (samples counted, samples skipped)."""
    if loss_fn is causal_lm_per_sample_loss:
        if not hasattr(batch, "keys") or "labels" not in batch:
            raise ValueError(
                "the default causal-LM path needs dict-like batches with 'labels' (-100: no loss), "
                "or pass loss_fn(model, batch) -> per-sample losses"
            )
        model(**model_inputs(batch))
        labels = batch["labels"]
        counted = int((labels[:, 1:] != IGNORE_INDEX).any(dim=1).sum().item())
        return counted, int(labels.shape[0]) - counted
    losses = loss_fn(model, batch)
    if not isinstance(losses, torch.Tensor) or losses.dim() > 1:
        raise TypeError("loss_fn must return a 1-D tensor of per-sample losses")
    return int(losses.numel()), 0


def _batch_size(batch: Any) -> int:
    labels = batch["labels"]
    return int(labels.shape[0])
