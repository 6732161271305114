"""Batches, token masks and the default per-sample loss."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


def move_to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor of a (nested) batch to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {key: move_to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(value, device) for value in batch)
    return batch


def token_mask_for(batch: Any, mode: Any) -> Optional[torch.Tensor]:
    """The batch's input token mask (``batch x seq``) of the tokens that enter ``Z`` and ``y``
    (per module: :mod:`lora_da.token_masks`). ``None`` means every token counts.
    ``mode``: ``"attention"``, ``"labels"``, ``"all"``/``None`` or a one-argument callable.
    """
    if callable(mode):
        mask = mode(batch)
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"token_mask callable must return a tensor, got {type(mask).__name__}")
        return mask
    if mode is None or mode == "all":
        return None
    if not isinstance(batch, Mapping):
        if mode == "attention":
            return None
        raise ValueError("token_mask='labels' needs dict-like batches with a 'labels' entry")
    if mode == "attention":
        return batch.get("attention_mask")
    # mode == "labels": token t counts when its next-token label is not ignored.
    labels = batch.get("labels")
    if labels is None:
        raise ValueError("token_mask='labels' needs a 'labels' entry in every batch")
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return mask


def as_causal_lm_batch(batch: Any) -> Any:
    """Dict-like batches pass through; a tuple/list is read as ``(input_ids, labels)``
    or ``(input_ids, attention_mask, labels)``."""
    if isinstance(batch, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in batch):
        if len(batch) == 2:
            return {"input_ids": batch[0], "labels": batch[1]}
        if len(batch) == 3:
            return {"input_ids": batch[0], "attention_mask": batch[1], "labels": batch[2]}
    return batch


def model_inputs(batch: Mapping) -> dict:
    """Keyword arguments for the model: the batch without ``labels`` (we compute the loss)."""
    return {key: value for key, value in batch.items() if key != "labels"}


def forward_inputs(model: nn.Module, batch: Mapping) -> dict:
    """:func:`model_inputs`, plus for an encoder-decoder model given ``labels`` but no
    ``decoder_input_ids`` the decoder inputs its own ``prepare_decoder_input_ids_from_labels``
    makes (the labels shifted right, as when the model is given ``labels``)."""
    inputs = model_inputs(batch)
    prepare = getattr(model, "prepare_decoder_input_ids_from_labels", None)
    if _is_encoder_decoder(model) and "decoder_input_ids" not in inputs and "decoder_inputs_embeds" not in inputs:
        if callable(prepare) and batch.get("labels") is not None:
            inputs["decoder_input_ids"] = prepare(labels=batch["labels"])
    return inputs


def logits_of(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, (tuple, list)):
        logits = output[0]
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"cannot find logits in the model's output of type {type(output).__name__}")
    return logits


def _is_encoder_decoder(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def loss_labels(model: nn.Module, labels: torch.Tensor) -> torch.Tensor:
    """The label each logit position predicts: the next one in a causal LM (shifted,
    the last position predicts nothing), the same position in an encoder-decoder
    (``config.is_encoder_decoder``: the decoder's logits are aligned with ``labels``)."""
    if _is_encoder_decoder(model):
        return labels
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def causal_lm_per_sample_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """Each sample's mean next-token cross-entropy (labels shifted, -100 ignored); for an
    encoder-decoder model (``config.is_encoder_decoder``), the decoder's cross-entropy
    against ``labels`` as they are (:func:`loss_labels`).

    Returns the losses of the samples that have at least one label, so that the
    sum over a batch is independent of how the data is split into batches.
    """
    if not isinstance(batch, Mapping) or "labels" not in batch:
        raise ValueError(
            "the default causal-LM loss needs dict-like batches with 'labels' (use -100 for tokens "
            "without loss), or (input_ids, [attention_mask,] labels) tuples, or pass "
            "loss_fn(model, batch) -> per-sample losses"
        )
    labels = batch["labels"]
    logits = logits_of(model(**forward_inputs(model, batch)))
    if logits.shape[:2] != labels.shape[:2]:
        raise ValueError(f"logits of shape {tuple(logits.shape)} do not match labels of shape {tuple(labels.shape)}")
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    # Shift the labels, not the logits: position t predicts label t+1, the last position
    # predicts nothing. Slicing the logits instead would copy the (batch x seq x vocab)
    # tensor, and its gradient, once per batch.
    shifted_labels = loss_labels(model, labels)
    token_losses = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        shifted_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(shifted_labels.shape)
    valid = shifted_labels != IGNORE_INDEX
    counts = valid.sum(dim=1)
    per_sample = token_losses.sum(dim=1) / counts.clamp(min=1)
    return per_sample[counts > 0]
