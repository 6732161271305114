"""The statistics pass: one hooked forward+backward per batch (forward only for methods
that need only ``Z``), resumable from checkpoints, leaving the model as found.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import nn
from tqdm.auto import tqdm

from .activation_checkpointing import (
    anchor_layer_inputs,
    checkpointed_layers,
    checkpointed_targets,
    recomputing_every_target,
    set_pass_modes,
)
from .checkpoint import StatisticsCheckpoint
from .fingerprint import statistics_fingerprint
from .collector import Collector
from .expert_collector import (
    ExpertCapture,
    LinearExpertRouting,
    experts_modules,
    routed_targets,
    split_expert_targets,
)
from .kernels.dispatch import select_backend
from .losses import (
    IGNORE_INDEX,
    as_causal_lm_batch,
    causal_lm_per_sample_loss,
    forward_inputs,
    loss_labels,
    move_to_device,
)
from .model_state import preserved_model_state
from .statistics import KFACStatistics, model_device, model_dtype
from .token_masks import ModuleMasks

logger = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, Any], torch.Tensor]


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
    statistics_precision: str = "auto",
    stats_checkpoint: Optional[str] = None,
    checkpoint_every: int = 50,
    forward_only: bool = False,
) -> KFACStatistics:
    """Run one hooked forward+backward per batch of ``loader`` and return the sums.

    ``loss_fn(model, batch)`` must return the per-sample losses of the batch (a
    1-D tensor, one entry per sample that counts); their sum is differentiated.
    The default is each sample's mean next-token loss (:func:`causal_lm_per_sample_loss`).
    The model runs in eval mode (no dropout); it is left exactly as found. When the user
    enabled activation checkpointing (transformers' ``gradient_checkpointing_enable``), it
    stays on, dropout off (:mod:`lora_da.activation_checkpointing`).
    ``token_mask``: each module's rows use their own mask (:mod:`lora_da.token_masks`):
    ``"attention"``, ``"labels"``, ``"all"``/``None``, ``token_mask(batch)`` (one mask)
    or ``token_mask(batch, module_name)`` (per module; a tensor or ``None``).
    ``check_totals=False`` skips :meth:`KFACStatistics.check_totals` (for a rank
    whose share of a distributed loader may be empty).
    ``stats_backend``: ``"auto"``, ``"torch"`` or ``"triton"`` (see
    :func:`lora_da.kernels.dispatch.select_backend`); ``stats.backend`` says which ran.
    ``statistics_precision``: the accumulators' dtypes (``"auto"``, ``"float32"``, ``"float64"``; same place).
    ``stats_checkpoint``/``checkpoint_every``: save the sums atomically every K
    batches and resume from them (see :mod:`lora_da.checkpoint`).
    NaN/Inf entering the sums, or a non-finite loss, is reported after the batch that
    brought it, with the first target module (in forward order) whose input or output
    was non-finite. ``progress``: a bar that counts the batches done.

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
    backend = select_backend(device, stats_backend, model_dtype(model), statistics_precision)
    layers = checkpointed_layers(model)
    # fused experts: captured by their module's forward; nn.Linear experts: their rows from the routing
    hooked, experts, containers = split_expert_targets(model, modules, stats_checkpoint, layers)
    masks = ModuleMasks(token_mask, model, modules, experts_modules(experts, containers))
    collector = Collector(
        hooked,
        backend,
        forward_only=forward_only,
        device=device,
        masks=masks,
        checkpointed=checkpointed_targets(layers, hooked),
        routed=routed_targets(containers),
    )
    routing = LinearExpertRouting(collector, containers)
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
        dtype = model_dtype(model) or torch.float32
        accumulators = f"Z {backend.input_factor_dtype(dtype)}, G/y {backend.gradient_dtype(dtype)}"
        fingerprint = statistics_fingerprint(model, modules, token_mask, loss_fn, backend.name, accumulators)
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

    with preserved_model_state(model) as handles, torch.set_grad_enabled(not forward_only), recomputing_every_target(
        layers
    ):
        set_pass_modes(model, layers)
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        for name, module in hooked.items():
            handles.append(module.register_forward_hook(collector.forward_hook(name), with_kwargs=True))
        for module, hook in masks.hooks():
            handles.append(module.register_forward_hook(hook))
        handles.extend(anchor_layer_inputs(layers, lambda: collector.anchor))
        if experts:
            handles.append(ExpertCapture(collector, experts).install())
        routing.install(handles)

        bar = tqdm(total=total, desc="lora-da statistics", unit="batch", disable=not progress, leave=False)
        try:
            for batch_index, batch in enumerate(loader):
                if max_batches is not None and batch_index >= max_batches:
                    break
                if batch_index >= resume_from:  # the earlier ones are in the checkpoint
                    _one_batch(collector, model, batch, batch_index, device, loss_fn, forward_only, bool(layers))
                    _maybe_checkpoint(checkpoint, collector)
                bar.update(1)  # after the batch: the bar counts batches done
                if batch_index >= resume_from and not forward_only:
                    elapsed = bar.format_dict.get("elapsed") or 0.0
                    bar.set_postfix(tokens=stats.num_tokens, tok_per_s=f"{stats.num_tokens / max(elapsed, 1e-9):.0f}")
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


def _one_batch(
    collector: Collector,
    model: nn.Module,
    batch: Any,
    batch_index: int,
    device: torch.device,
    loss_fn: LossFn,
    forward_only: bool,
    checkpointing: bool = False,
) -> None:
    """One batch of the pass: hooked forward (+ backward), its counts added to the
    statistics, NaN/Inf refused. Host syncs: one for the token masks (their kept tokens,
    before the forward) and one after the batch (:meth:`Collector.check_batch_finite`:
    the loss and every finiteness flag at once)."""
    stats = collector.stats
    stats.num_batches += 1
    batch = move_to_device(batch, device)
    if loss_fn is causal_lm_per_sample_loss:
        batch = as_causal_lm_batch(batch)
    kept = collector.masks.start_batch(batch, device)
    if kept == 0:
        stats.skipped_batches += 1
        logger.info("batch %d: the token mask keeps no token; skipped", batch_index)
        return
    collector.start_batch(device)
    if forward_only:
        samples, skipped = _forward_only_batch(model, batch, loss_fn)
        collector.end_batch(batch_index)
        collector.check_batch_finite(batch_index)
        stats.num_samples += samples
        stats.skipped_samples += skipped
        return
    losses = loss_fn(model, batch)
    if not isinstance(losses, torch.Tensor) or losses.dim() > 1:
        raise TypeError(
            "loss_fn must return a 1-D tensor of per-sample losses, got "
            + (f"shape {tuple(losses.shape)}" if isinstance(losses, torch.Tensor) else type(losses).__name__)
        )
    losses = losses.reshape(-1)
    total_loss = losses.sum()
    if not total_loss.requires_grad:
        raise RuntimeError("the loss does not depend on any target module's output")
    # a non-finite loss is refused after the backward, by the batch's one finiteness
    # check (which then also names where the forward pass went non-finite): no host
    # sync here; the sums of a refused batch are never used
    collector.in_backward = True  # forwards from here on are checkpoint recomputations
    if checkpointing:  # reentrant checkpoints refuse torch.autograd.grad; parameters are frozen
        total_loss.backward()
    else:
        torch.autograd.grad(total_loss, collector.anchor)
    collector.in_backward = False
    collector.end_batch(batch_index)
    collector.check_batch_finite(batch_index, loss=total_loss)
    stats.num_samples += losses.numel()
    stats.skipped_samples += _batch_size(batch) - losses.numel() if loss_fn is causal_lm_per_sample_loss else 0


def _maybe_checkpoint(checkpoint: Optional[StatisticsCheckpoint], collector: Collector) -> None:
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
        model(**forward_inputs(model, batch))
        labels = loss_labels(model, batch["labels"])
        counted = int((labels != IGNORE_INDEX).any(dim=1).sum().item())
        return counted, int(labels.shape[0]) - counted
    losses = loss_fn(model, batch)
    if not isinstance(losses, torch.Tensor) or losses.dim() > 1:
        raise TypeError("loss_fn must return a 1-D tensor of per-sample losses")
    return int(losses.numel()), 0


def _batch_size(batch: Any) -> int:
    labels = batch["labels"]
    return int(labels.shape[0])
