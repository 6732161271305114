"""The K-FAC statistics a pass accumulates, and their normalizations (docs/math.md §2).

For every target module (sums before normalization):

* ``grad_sum``  = Σ_samples ∇_W ℓ_sample  (→ ``G = grad_sum / n``)
* ``output_factor_diag_sum`` = Σ_t m_t g_t ⊙ g_t  (→ ``y = ... / |T_module|``)
* ``num_tokens`` = |T_module| = Σ_t m_t over the rows this module saw

and for every group of modules that receive the *same input tensor* (with the same mask):

* ``input_factor_sum`` = Σ_t m_t a_t a_tᵀ  (→ ``Z = ... / |T_group| + λI``)
* ``num_tokens`` = |T_group|

Each module's rows and mask are its own (encoder, decoder, one row per sample for a
pooler or classifier head, a vision tower's patches: :mod:`lora_da.token_masks`); a
module may see a subset of the batch's rows (e.g. a routed expert), so a module's
count may differ from its group's.

The pass that fills them is :func:`lora_da.statistics_pass.collect_statistics`
(its hooks: :mod:`lora_da.collector`).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn


@dataclass
class InputGroup:
    """Modules fed the same input tensor, and their shared ``Σ m a aᵀ``."""

    members: Tuple[str, ...]
    input_factor_sum: torch.Tensor
    num_tokens: int = 0  # |T_group|: the mask-weighted rows summed into input_factor_sum


@dataclass
class ModuleStatistics:
    """Accumulated sums of one target module."""

    name: str
    group_index: int
    grad_sum: Optional[torch.Tensor]  # d_out x d_in (None after a forward-only pass)
    output_factor_diag_sum: Optional[torch.Tensor]  # d_out (None after a forward-only pass)
    num_tokens: int = 0  # |T_module|: the mask-weighted rows summed into output_factor_diag_sum


@dataclass
class KFACStatistics:
    """The statistics pass's result; the accessors apply the normalizations of docs/math.md §2."""

    modules: Dict[str, ModuleStatistics]
    groups: List[InputGroup]
    num_samples: int = 0
    num_tokens: int = 0  # for reports: the tokens of the first target module in forward order (the input's)
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
    routed: set = field(default_factory=set)  # nn.Linear experts: targets that may skip a batch (no token routed)

    def _require_gradients(self, name: str) -> None:
        if not self.has_gradients or self.modules[name].grad_sum is None:
            raise ValueError(
                f"these statistics come from a forward-only pass: module '{name}' has no gradient G or output factor y"
            )

    def tokens(self, name: str) -> int:
        """``|T_module|`` of module ``name``: the kept rows it saw (an expert: the kept tokens routed to it)."""
        return int(self.modules[name].num_tokens)

    def gradient(self, name: str) -> torch.Tensor:
        """``G = (1/n) Σ_samples ∇_W ℓ_sample`` (``d_out x d_in``)."""
        self._require_gradients(name)
        return self.modules[name].grad_sum / self.num_samples

    def input_factor(self, name: str) -> torch.Tensor:
        """``(1/|T_group|) Σ_t m_t a_t a_tᵀ`` of the module's input group, *without* damping."""
        group = self.groups[self.modules[name].group_index]
        return group.input_factor_sum / group.num_tokens

    def output_factor_diag(self, name: str) -> torch.Tensor:
        """``y = (1/|T_module|) Σ_t m_t g_t ⊙ g_t``, *without* damping."""
        self._require_gradients(name)
        return self.modules[name].output_factor_diag_sum / self.tokens(name)

    def group_tokens(self) -> Dict[int, int]:
        """``{group index: |T_group|}``."""
        return {index: int(group.num_tokens) for index, group in enumerate(self.groups)}

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
        # experts (``routed``) are exempt: one that kept fewer than rank tokens gets PEFT's
        # default init (lora_da.expert_fallback)
        for group in self.groups:
            if group.num_tokens == 0 and not self.routed.issuperset(group.members):
                raise ValueError(
                    f"the token mask of module '{group.members[0]}' (input shared by {list(group.members)}) "
                    "kept no row in any batch: Z and y have no tokens to average"
                )
        for stats in self.modules.values():
            if stats.num_tokens == 0 and stats.grad_sum is not None and stats.name not in self.routed:
                raise ValueError(f"the token mask of module '{stats.name}' kept no row in any batch")
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


class AccumulateClock:
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


def model_device(model: nn.Module) -> torch.device:
    """Where the model computes: its first parameter's device, skipping ``meta`` ones (weights
    offloaded by accelerate, loaded to the hook's ``execution_device`` for each forward)."""
    for parameter in model.parameters():
        if not parameter.is_meta:
            return parameter.device
    hook_device = getattr(getattr(model, "_hf_hook", None), "execution_device", None)
    return torch.device(hook_device) if hook_device is not None else torch.device("cpu")


def model_dtype(model: nn.Module) -> Optional[torch.dtype]:
    """The dtype of the model's first floating-point parameter (``None`` when it has none)."""
    for parameter in model.parameters():
        if parameter.is_floating_point():
            return parameter.dtype
    return None
