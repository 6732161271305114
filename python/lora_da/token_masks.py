"""Which rows of each target module count in ``Z`` and ``y``: every module's own token
mask, resolved per batch (docs/math.md §2, "Each module's own tokens").

A module's rows are ``inputs.numel() // d_in`` (``B·T`` for a token-wise layer). The
masks of a batch are computed once, before the forward, and their kept counts read in
one host sync; each module then takes, from its input:

* a **two-argument callable** ``token_mask(batch, module_name)``: its tensor (with as
  many entries as the module has rows; a mismatch is an error naming both shapes), or
  ``None`` for every row;
* an **encoder-decoder** model (``config.is_encoder_decoder`` and ``get_encoder()``):
  modules inside the encoder, and modules fed the encoder's output (cross-attention
  keys/values), use the *encoder* mask (``attention_mask``; a mismatch is an error);
  the others use the *decoder* mask when their rows match it
  (``decoder_attention_mask``, else ``labels != -100``; ``"labels"``: ``labels != -100``);
* otherwise (and for the decoder modules that match neither): the batch's mask
  (``"attention"``/``"labels"``/a one-argument callable) when the module's rows equal its
  entries; else every row counts — one row per sample for a pooler or classifier head
  (``B`` rows), a vision tower's patches — and modules with other row counts than ``B``
  are named once in a warning.

A module's count is the sum of its mask over its rows (the number of rows when every
row counts); ``KFACStatistics.num_tokens`` is the count of the first target module in
forward order (the input tokens), for reports.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from .losses import IGNORE_INDEX, token_mask_for
from .user_warnings import warn_user


@dataclass
class RowMask:
    """One mask of a batch: flat weights (``None``: every row has weight 1), entries, kept count."""

    weights: Optional[torch.Tensor]
    entries: int
    kept: int
    source: str  # for messages: "the encoder's token mask", ...
    shape: Tuple[int, ...] = ()


def takes_module_name(token_mask: Any) -> bool:
    """True for a callable that accepts ``(batch, module_name)``."""
    if not callable(token_mask):
        return False
    try:
        inspect.signature(token_mask).bind(None, None)
    except TypeError:
        return False
    except ValueError:  # no signature (a builtin): the one-argument form
        return False
    return True


def is_encoder_decoder(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return bool(getattr(config, "is_encoder_decoder", False)) and callable(getattr(model, "get_encoder", None))


def _decoder_mask(batch: Any, mode: Any) -> Optional[torch.Tensor]:
    if not isinstance(batch, Mapping) or mode is None or mode == "all":
        return None
    if mode == "attention" and batch.get("decoder_attention_mask") is not None:
        return batch["decoder_attention_mask"]
    labels = batch.get("labels")
    return None if labels is None else labels != IGNORE_INDEX


class ModuleMasks:
    """Per batch, the mask each target module's rows use (see the module doc)."""

    def __init__(
        self,
        token_mask: Any,
        model: nn.Module,
        modules: Dict[str, nn.Module],
        experts: Optional[Dict[str, Tuple[nn.Module, str]]] = None,
    ):
        """``experts``: ``{experts module name: (module, a target inside it)}`` of the MoE
        experts modules (:func:`lora_da.expert_collector.experts_modules`), whose routed rows
        take their part of the mask :meth:`experts_mask` gives their input."""
        self.mode = token_mask
        self.per_module = takes_module_name(token_mask)
        self.names = list(modules)
        self.experts = dict(experts or {})
        self.encoder: Optional[nn.Module] = None
        self.in_encoder: set = set()
        if is_encoder_decoder(model) and not callable(token_mask):
            self.encoder = model.get_encoder()
            inside = {id(m) for m in self.encoder.modules()}
            self.in_encoder = {name for name, module in modules.items() if id(module) in inside}
            self.in_encoder |= {name for name, (module, _) in self.experts.items() if id(module) in inside}
        self.encoder_output: Optional[weakref.ref] = None
        self.unmatched: Dict[str, Tuple[int, str]] = {}  # module -> (rows, the mask it did not match)
        self.warned = False
        self._start_empty()

    def _start_empty(self) -> None:
        self.input_mask: Optional[RowMask] = None
        self.decoder: Optional[RowMask] = None
        self.by_module: Dict[str, Optional[RowMask]] = {}
        self.samples: Optional[int] = None
        self.routed: Dict[str, RowMask] = {}  # nn.Linear experts: the mask of the rows routed to them

    def hooks(self) -> List[Tuple[nn.Module, Any]]:
        """``(module, forward hook)`` pairs the pass registers: the encoder's output is
        recorded so that modules fed it (cross-attention) use the encoder's mask."""
        if self.encoder is None:
            return []

        def record(module: nn.Module, args: tuple, output: Any) -> None:
            hidden = getattr(output, "last_hidden_state", None)
            if hidden is None and isinstance(output, (tuple, list)) and output:
                hidden = output[0]
            self.encoder_output = weakref.ref(hidden) if isinstance(hidden, torch.Tensor) else None

        return [(self.encoder, record)]

    def start_batch(self, batch: Any, device: torch.device) -> Optional[int]:
        """Compute the batch's masks (one host sync for all of them). Returns the tokens the
        batch's input mask keeps (``None`` without one): 0 means the batch is skipped. With
        a per-module callable, the sum over modules' masks (``None`` when one is ``None``)."""
        self._start_empty()
        self.encoder_output = None
        raw: List[Tuple[str, Optional[torch.Tensor], str]] = []
        if self.per_module:
            for name in self.names:
                raw.append((name, self._call(batch, name), f"token_mask(batch, '{name}')"))
        else:
            input_source = "the encoder's token mask" if self.encoder is not None else "the token mask"
            mode = "attention" if self.encoder is not None and self.mode == "labels" else self.mode
            raw.append(("input", token_mask_for(batch, mode), input_source))
            if self.encoder is not None:
                raw.append(("decoder", _decoder_mask(batch, self.mode), "the decoder's token mask"))
        distinct: Dict[int, Tuple[torch.Tensor, str]] = {}
        for _, tensor, source in raw:
            if tensor is not None:
                distinct.setdefault(id(tensor), (tensor, source))
        masks: Dict[int, RowMask] = {}
        if distinct:
            flats = [t.reshape(-1).to(device=device) for t, _ in distinct.values()]
            sums = torch.stack(
                [
                    v
                    for f in flats
                    for v in (
                        f.sum(dtype=torch.float64),
                        (f != 1).sum(dtype=torch.float64),
                        ((f < 0) | ~torch.isfinite(f)).sum(dtype=torch.float64),
                    )
                ]
            )
            values = sums.tolist()  # the one host sync before the forward
            for index, (key, (tensor, source)) in enumerate(distinct.items()):
                invalid = int(values[3 * index + 2])
                if invalid:
                    # Z = Σ m·a aᵀ must stay positive semi-definite (and the CPU kernel
                    # scales rows by √m): weights are non-negative and finite.
                    raise ValueError(
                        f"lora-da: {source} has {invalid} negative or non-finite entries "
                        f"(shape {tuple(tensor.shape)}); token weights must be finite and >= 0"
                    )
                kept, not_one = int(values[3 * index]), int(values[3 * index + 1])
                masks[key] = RowMask(
                    weights=None if not_one == 0 else flats[index],
                    entries=flats[index].numel(),
                    kept=kept,
                    source=source,
                    shape=tuple(tensor.shape),
                )
        resolved = {key: (None if tensor is None else masks[id(tensor)]) for key, tensor, _ in raw}
        if self.per_module:
            self.by_module = resolved
            if any(m is None for m in resolved.values()):
                return None
            return sum(m.kept for m in resolved.values())
        self.input_mask, self.decoder = resolved["input"], resolved.get("decoder")
        first = raw[0][1]
        self.samples = int(first.shape[0]) if first is not None and first.dim() >= 2 else None
        return None if self.input_mask is None else self.input_mask.kept

    def _call(self, batch: Any, name: str) -> Optional[torch.Tensor]:
        mask = self.mode(batch, name)
        if mask is not None and not isinstance(mask, torch.Tensor):
            raise TypeError(f"token_mask(batch, '{name}') must return a tensor or None, got {type(mask).__name__}")
        return mask

    def resolve(self, name: str, rows: int, inputs: torch.Tensor) -> Optional[RowMask]:
        """The mask of module ``name``'s ``rows`` (``None``: every row counts, weight 1)."""
        if name in self.routed:
            return self._checked(name, rows, inputs, self.routed[name])
        if self.per_module:
            return self._checked(name, rows, inputs, self.by_module.get(name))
        if self.encoder is not None:
            output = None if self.encoder_output is None else self.encoder_output()  # alive: its storage is its own
            fed_encoder_output = (
                output is not None
                and output.data_ptr() == inputs.data_ptr()
                and output.shape == inputs.shape
                and output.device == inputs.device
            )
            if name in self.in_encoder or fed_encoder_output:
                return self._checked(name, rows, inputs, self.input_mask)
            for mask in (self.decoder, self.input_mask):
                if mask is not None and mask.entries == rows:
                    return mask
            candidate = self.decoder or self.input_mask
        else:
            candidate = self.input_mask
            if candidate is not None and candidate.entries == rows:
                return candidate
        if candidate is not None and rows != self.samples:
            self.unmatched.setdefault(name, (rows, f"{candidate.source} has {candidate.entries} entries"))
        return None

    def experts_mask(self, experts_name: str, rows: int, inputs: torch.Tensor) -> Optional[RowMask]:
        """The mask of the ``rows`` an MoE experts module is called with (its tokens, before
        routing): with a per-module callable, the one it gives for a target inside the
        module; otherwise the mask a target module with that input would use."""
        if self.per_module:
            return self._checked(experts_name, rows, inputs, self.by_module.get(self.experts[experts_name][1]))
        return self.resolve(experts_name, rows, inputs)

    def route(self, name: str, mask: Optional[RowMask], token: torch.Tensor, kept: int) -> None:
        """Give nn.Linear expert ``name`` the rows ``token`` of its experts module's ``mask``
        (``kept``: their mask-weighted count, read by the caller)."""
        weights = None if mask is None or mask.weights is None else mask.weights[token]
        source = f"the {token.numel()} tokens routed to it"
        self.routed[name] = RowMask(weights, int(token.numel()), kept, source, (int(token.numel()),))

    def _checked(self, name: str, rows: int, inputs: torch.Tensor, mask: Optional[RowMask]) -> Optional[RowMask]:
        if mask is not None and mask.entries != rows:
            raise ValueError(
                f"module '{name}' got input of shape {tuple(inputs.shape)} ({rows} rows) but {mask.source} "
                f"has shape {mask.shape} ({mask.entries} entries)"
            )
        return mask

    def warn_unmatched(self) -> None:
        """Once per pass (after the first batch): the modules whose rows matched no mask."""
        if self.warned or not self.unmatched:
            return
        self.warned = True
        names = list(self.unmatched)
        shown = ", ".join(f"'{n}' ({self.unmatched[n][0]} rows)" for n in names[:5])
        more = f" and {len(names) - 5} more" if len(names) > 5 else ""
        warn_user(
            f"token mask: {len(names)} target module(s) see a row count that matches no token mask "
            f"({self.unmatched[names[0]][1]}): {shown}{more}; every row of theirs counts in Z and y "
            "(pass token_mask(batch, module_name) to choose)"
        )
