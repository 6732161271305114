"""The hooks of the statistics pass: per batch, they feed each target's input and
output gradient to the statistics backend (docs/math.md §2).

A forward hook on each target module records its input and adds a zero
"anchor" scalar to its output; a tensor hook on that output receives the output
gradient ``g`` during ``torch.autograd.grad(loss, anchor)``. All parameters have
``requires_grad`` switched off for the pass, so no weight gradient is computed
and no ``param.grad`` is allocated; the anchor makes every target output part
of the graph even when nothing upstream requires grad. Shared inputs are
detected from the tensors themselves (same storage, shape, strides, version).

NaN/Inf is traced without extra host syncs: the forward hook writes the sum of
each target's output into a small preallocated device tensor (a sum is finite
exactly when every entry is), in the order the targets run; inputs are traced
by ``Z``'s diagonal. :meth:`Collector.check_batch_finite` reads these flags, the
loss and the sums' checks in one host read per batch and names the first
target, in forward order, whose input or output was non-finite.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

# ``kernels/`` sits at the repository's top level (the design keeps the Triton kernels
# there); CMakeLists.txt installs it into the wheel as the subpackage ``lora_da.kernels``.
from .kernels.dispatch import TORCH_BACKEND, StatisticsBackend
from .layers import linear_dims
from .statistics import InputGroup, KFACStatistics, ModuleStatistics


def _accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 models accumulate in fp64; everything else in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tensor_key(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, t.device, t._version)


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


@dataclass
class _LiveInput:
    """One input tensor seen in the current batch, until its members' gradients arrive."""

    rows: Optional[torch.Tensor]
    group_index: int
    weights: Optional[torch.Tensor] = None  # the rows' token weights (None: all 1)
    members: List[str] = field(default_factory=list)
    pending: int = 0


class Collector:
    """The per-batch state of the hooks and the statistics they fill."""

    def __init__(
        self,
        modules: Dict[str, nn.Linear],
        backend: StatisticsBackend = TORCH_BACKEND,
        forward_only: bool = False,
        device: Optional[torch.device] = None,
    ):
        self.modules = modules
        self.backend = backend
        self.clock = AccumulateClock(device or torch.device("cpu"))
        self.forward_only = forward_only  # only Z: no anchor, no output-gradient hooks
        self.stats = KFACStatistics(modules={}, groups=[], has_gradients=not forward_only)
        self.group_of: Dict[str, int] = {}
        # per batch, the targets in the order they ran and the sums of their outputs
        # (slot i: the i-th target run); kept after end_batch for check_batch_finite
        self.forward_order: List[str] = []
        self.output_sums: Optional[torch.Tensor] = None
        # nn.Linear experts (lora_da.expert_collector.LinearExpertRouting): targets that may skip a
        # batch, and per batch their own rows' token weights, row count and kept-token count
        self.routed: set = set()
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
        self.row_weights: Dict[str, Optional[torch.Tensor]] = {}
        self.row_rows: Dict[str, int] = {}
        self.row_counts: Dict[str, int] = {}

    def start_batch(
        self, token_weights: Optional[torch.Tensor], device: torch.device, all_tokens_kept: bool = False
    ) -> None:
        """``all_tokens_kept``: the mask keeps every token, so the sums skip the
        multiplication by the weights (the row count is still checked)."""
        self._reset_batch()
        self.forward_order = []
        self.expected_rows = None if token_weights is None else token_weights.numel()
        self.token_weights = None if all_tokens_kept else token_weights
        self.active = True
        if not self.forward_only:
            self.anchor = torch.zeros((), device=device, requires_grad=True)

    def check_batch_finite(self, batch_index: int, loss: Optional[torch.Tensor] = None) -> None:
        """Raise on a non-finite ``loss`` (the batch's summed loss, when given) or on
        NaN/Inf that entered the sums in this batch, naming module and batch.

        A NaN/Inf input shows on Z's diagonal (Σ m a²), a NaN/Inf output gradient
        on y (Σ m g²); fp16/bf16 overflow shows as Inf. The message also names the
        first target module, in forward order, whose input or output was non-finite
        (:meth:`_trace`). One host read per batch: the loss, every flag and the
        output sums come back in one ``tolist``.
        """
        groups = self.stats.groups
        modules = [m for m in self.stats.modules.values() if m.output_factor_diag_sum is not None]
        flags = [torch.isfinite(torch.diagonal(g.input_factor_sum)).all() for g in groups]
        flags += [torch.isfinite(m.output_factor_diag_sum).all() for m in modules]
        parts = [torch.stack(flags).to(torch.float64)] if flags else []
        if self.forward_order and self.output_sums is not None:
            parts.append(torch.isfinite(self.output_sums[: len(self.forward_order)]).to(torch.float64))
        if loss is not None:
            parts.append(loss.detach().reshape(1).to(torch.float64))
        if not parts:
            return
        device = parts[0].device
        values = torch.cat([part.to(device) for part in parts]).tolist()  # the one host sync
        loss_value = values.pop() if loss is not None else None
        group_ok = [v != 0 for v in values[: len(groups)]]
        gradient_ok = [v != 0 for v in values[len(groups) : len(groups) + len(modules)]]
        output_ok = [v != 0 for v in values[len(groups) + len(modules) :]]
        loss_ok = loss_value is None or math.isfinite(loss_value)
        if loss_ok and all(group_ok) and all(gradient_ok):
            return
        trace, first_is_output = self._trace(group_ok, output_ok)
        if not loss_ok:
            raise FloatingPointError(f"the loss of batch {batch_index} is {loss_value}; {trace}")
        if not all(group_ok):
            members = groups[group_ok.index(False)].members
            raise FloatingPointError(
                f"NaN/Inf in the input of module '{members[0]}' (shared by {list(members)}) in batch {batch_index}"
                + (f"; {trace}" if first_is_output else "")
            )
        raise FloatingPointError(
            f"NaN/Inf in the output gradient of module '{modules[gradient_ok.index(False)].name}' in batch {batch_index}"
        )

    def _trace(self, group_ok: List[bool], output_ok: List[bool]) -> Tuple[str, bool]:
        """Where the forward pass first went non-finite, in words (and whether at a target's output).

        In forward order, each target's input (its group's Z diagonal) and then its
        output (its output sum) are checked; the first non-finite one is named."""
        for position, name in enumerate(self.forward_order):
            group = self.group_of.get(name)
            if group is not None and group < len(group_ok) and not group_ok[group]:
                if position == 0:
                    return (
                        f"the input of the first target module '{name}' (in forward order) was already non-finite: "
                        "no target module's output was non-finite before it, the NaN/Inf starts before any "
                        "target module (e.g. in the embedding)",
                        False,
                    )
                return (
                    f"the first non-finite value in forward order is the input of target module '{name}' while "
                    "every earlier target module's output was finite: it starts outside the target modules, "
                    "before this one",
                    False,
                )
            if position < len(output_ok) and not output_ok[position]:
                return (
                    f"the first non-finite value in forward order is the output of target module '{name}' "
                    "(its input was finite)",
                    True,
                )
        return (
            "no target module's input or output was non-finite: it arises after the last target module "
            "(or in the loss)",
            False,
        )

    def state(self) -> dict:
        """The sums and counts, for a checkpoint (:mod:`lora_da.checkpoint`): only tensors,
        tuples/lists, str, int and bool, so that it is stored without pickle::

            {"groups": [(members, Z_sum)], "modules": [(name, group_index, G_sum, y_sum)],
             "counts": (num_samples, num_tokens, num_batches, skipped_batches, skipped_samples),
             "forward_only": bool}

        ``G_sum``/``y_sum`` are ``None`` after a forward-only pass.
        """
        st = self.stats
        return {
            "groups": [(tuple(g.members), g.input_factor_sum) for g in st.groups],
            "modules": [
                (m.name, int(m.group_index), m.grad_sum, m.output_factor_diag_sum) for m in st.modules.values()
            ],
            "counts": tuple(
                int(c) for c in (st.num_samples, st.num_tokens, st.num_batches, st.skipped_batches, st.skipped_samples)
            ),
            "forward_only": bool(self.forward_only),
        }

    def restore(self, state: dict) -> None:
        """Go on from ``state`` (as :meth:`state` returns it, e.g. read back and validated by
        :meth:`lora_da.checkpoint.StatisticsCheckpoint.load`). ``ValueError`` when it names
        modules that are not this pass's targets."""
        unknown = sorted({name for name, _, _, _ in state["modules"]} - set(self.modules))
        if unknown:
            raise ValueError(f"saved statistics name modules that are not targets of this pass: {unknown[:5]}")
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
            if name in self.routed and name not in self.live_by_module:
                continue  # an expert that got no token in this batch
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
        routed = name in self.row_rows  # an nn.Linear expert: only the tokens routed to it
        weights = self.row_weights.get(name) if routed else self.token_weights
        if routed and rows != self.row_rows[name]:
            raise ValueError(f"expert module '{name}' got {rows} rows but {self.row_rows[name]} tokens were routed to it")
        if not routed and self.expected_rows is not None and rows != self.expected_rows:
            raise ValueError(
                f"module '{name}' got input of shape {tuple(inputs.shape)} ({rows} tokens) but the "
                f"token mask has {self.expected_rows} entries; pass token_mask=None or a "
                "callable that matches the module's inputs"
            )
        if self.batch_rows is None and not routed:
            self.batch_rows = rows
        self._record_output(name, output)

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
                self.backend.accumulate_input_factor(self.stats.groups[group_index].input_factor_sum, flat, weights)
            if routed:
                self.stats.groups[group_index].num_tokens += self.row_counts[name]
            live = _LiveInput(rows=flat, group_index=group_index, weights=weights)
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
        if routed:
            self.stats.modules[name].num_tokens += self.row_counts[name]
        if self.forward_only:  # Z only; `live` keeps the input alive until the batch ends, so
            return None  # that its storage is not reused by another input (sharing is detected by address)
        live.pending += 1

        anchored = output + self.anchor.to(output.dtype)
        anchored.register_hook(self._gradient_hook(name, d_out))
        return anchored

    def _record_output(self, name: str, output: torch.Tensor) -> None:
        """Write the sum of ``output`` into its forward-order slot of ``output_sums``
        (on the device: no host sync). The sum is accumulated in float64 (float32 on
        MPS), so it is non-finite exactly when some entry is."""
        slot = len(self.forward_order)
        self.forward_order.append(name)
        # plain tensors only: a tensor subclass (e.g. a DTensor) would not mix with the plain buffer
        if type(output) is not torch.Tensor or not output.is_floating_point():
            if self.output_sums is not None:
                self.output_sums[slot].zero_()  # not traced: finite
            return
        if self.output_sums is None:
            dtype = torch.float32 if output.device.type == "mps" else torch.float64
            self.output_sums = torch.zeros(len(self.modules), dtype=dtype, device=output.device)
        target = self.output_sums[slot]
        values = output.detach()
        if values.device == target.device and values.dim() > 0:  # one reduction kernel, straight into the slot
            torch.sum(values, dim=tuple(range(values.dim())), dtype=target.dtype, out=target)
        else:
            target.copy_(values.sum(dtype=target.dtype))

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
                    live.weights,
                )
            self.gradients_seen.add(name)
            live.pending -= 1
            if live.pending == 0:
                live.rows = None  # release the activation as soon as its group is done

        return hook
