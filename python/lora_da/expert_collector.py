"""Per-expert statistics of fused MoE experts during the statistics pass (docs/math.md §2.1).

For the pass only, each experts module holding targets (:mod:`lora_da.experts`)
runs :func:`_capture_forward` instead of its own forward (an instance attribute,
removed afterwards, even on error): the same computation written as one loop
over the experts that got tokens, in which expert ``e``'s input rows (the
tokens routed to it), its projections' outputs and their output gradients are
visible. Each expert matrix gets its own input group (its ``Z_e``), its own
``G_e`` and ``y_e``, and its own token count ``|T_e|`` (the kept tokens routed
to it); an expert that got no token in a batch contributes nothing. On the first
batch the captured forward is checked against the module's own forward
(``torch.no_grad``): a module whose computation differs is refused by name.
"""

from __future__ import annotations

import types
from typing import Dict, FrozenSet, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn

from .collector import _accumulator_dtype
from .experts import ExpertSlice
from .statistics import InputGroup, ModuleStatistics


def split_expert_targets(
    model: nn.Module,
    targets: Dict[str, object],
    stats_checkpoint: Optional[str] = None,
    checkpointed_layers: Sequence[nn.Module] = (),
) -> Tuple[Dict[str, nn.Module], Dict[str, ExpertSlice], dict]:
    """``(hooked modules, fused expert targets, containers of nn.Linear experts)``
    (:func:`linear_expert_containers`). Experts with a statistics checkpoint, under
    torch.distributed or inside an activation-checkpointed layer are refused: their own
    token counts are neither checkpointed nor all-reduced yet, and the recomputation of
    their routing is not followed."""
    experts = {name: t for name, t in targets.items() if isinstance(t, ExpertSlice)}
    hooked = {name: t for name, t in targets.items() if name not in experts}
    containers = linear_expert_containers(model, hooked)
    example = next(iter(experts), None) or next((m[0] for _, by in containers.values() for m in by.values()), None)
    inside = {id(sub) for layer in checkpointed_layers for sub in layer.modules()}
    modules = experts_modules(experts, containers)
    checkpointed = next((name for name, (module, _) in modules.items() if id(module) in inside), None)
    if checkpointed is not None:
        raise ValueError(
            f"MoE experts '{checkpointed}' run inside an activation-checkpointed layer, which the statistics pass "
            "does not follow for experts yet; call model.gradient_checkpointing_disable() for the pass"
        )
    if example is not None and dist.is_available() and dist.is_initialized():
        raise ValueError(
            f"MoE expert targets (e.g. '{example}') are not supported under torch.distributed yet: "
            "their per-expert token counts are not all-reduced; leave the experts out of target_modules"
        )
    offloaded = next((t for t in experts.values() if getattr(t.experts, t.parameter_name).is_meta), None)
    if offloaded is not None:
        raise ValueError(
            f"experts '{offloaded.parameter_key}' are on the meta device (offloaded by a device_map?): the pass "
            "computes the experts itself and needs their weights; load the model without offloading the experts"
        )
    if example is not None and stats_checkpoint is not None:
        raise ValueError(
            f"stats_checkpoint is not supported with MoE expert targets (e.g. '{example}'): "
            "their per-expert token counts are not checkpointed; drop stats_checkpoint or the experts"
        )
    return hooked, experts, containers


def experts_modules(
    experts: Dict[str, ExpertSlice], containers: Dict[str, Tuple[nn.Module, Dict[int, List[str]]]]
) -> Dict[str, Tuple[nn.Module, str]]:
    """``{experts module name: (module, one target inside it)}``: the fused experts modules and
    the containers of nn.Linear experts (their input's token mask: :mod:`lora_da.token_masks`)."""
    found: Dict[str, Tuple[nn.Module, str]] = {}
    for name, target in experts.items():
        found.setdefault(target.module_name, (target.experts, name))
    for name, (container, by_expert) in containers.items():
        found.setdefault(name, (container, next(iter(by_expert.values()))[0]))
    return found


def routed_targets(containers: Dict[str, Tuple[nn.Module, Dict[int, List[str]]]]) -> FrozenSet[str]:
    """The linear targets of the containers: each may skip a batch (no token routed to it)."""
    return frozenset(m for _, by_expert in containers.values() for members in by_expert.values() for m in members)


class _Plan:
    """One experts module's targets: ``names[parameter][index]`` → target name."""

    def __init__(self, module_name: str, module: nn.Module) -> None:
        self.module_name = module_name
        self.module = module
        self.names: Dict[str, Dict[int, str]] = {}
        self.checked = False


class ExpertCapture:
    """Installs the capturing forwards and fills ``collector.stats`` for the expert targets."""

    def __init__(self, collector, slices: Dict[str, ExpertSlice]) -> None:
        self.collector = collector
        self.plans: Dict[int, _Plan] = {}
        for name, target in slices.items():
            plan = self.plans.setdefault(id(target.experts), _Plan(target.module_name, target.experts))
            plan.names.setdefault(target.parameter_name, {})[target.index] = name
        self.called: set = set()  # (experts module, batch) pairs run

    def install(self) -> "ExpertCapture":
        """Replace each experts module's forward (see :meth:`remove`)."""
        self._saved: List[Tuple[nn.Module, Optional[object]]] = []
        for plan in self.plans.values():
            module = plan.module
            self._saved.append((module, module.__dict__.get("forward")))
            original = module.forward
            module.forward = types.MethodType(
                lambda mod, *args, _plan=plan, _original=original, **kwargs: self._forward(_plan, _original, *args, **kwargs),
                module,
            )
        return self

    def remove(self) -> None:
        """Put every forward back as found (a handle of :func:`lora_da.model_state.preserved_model_state`)."""
        for module, saved in getattr(self, "_saved", []):
            if saved is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = saved
        self._saved = []

    # -- the captured computation -----------------------------------------------------
    def _forward(self, plan: _Plan, original, *args, **kwargs):
        values = list(args) + list(kwargs.values())  # (hidden_states, top_k_index, top_k_weights), however passed
        if len(values) != 3:
            raise TypeError(f"experts module '{plan.module_name}' was called with {len(values)} arguments, expected 3")
        hidden_states, top_k_index, top_k_weights = values
        collector = self.collector
        if not collector.active:
            return original(hidden_states, top_k_index, top_k_weights)
        batch = (plan.module_name, collector.stats.num_batches)
        if batch in self.called:
            raise RuntimeError(
                f"experts module '{plan.module_name}' was called more than once in one forward pass "
                "(weight sharing or activation checkpointing is not supported)"
            )
        self.called.add(batch)
        module = plan.module
        rows = hidden_states.shape[0]
        if hidden_states.dim() != 2 or top_k_index.shape[0] != rows or tuple(top_k_weights.shape) != tuple(top_k_index.shape):
            raise ValueError(
                f"experts module '{plan.module_name}' got hidden states {tuple(hidden_states.shape)}, routing "
                f"{tuple(top_k_index.shape)} and weights {tuple(top_k_weights.shape)}; expected (T, d), (T, k), (T, k)"
            )
        mask = collector.masks.experts_mask(plan.module_name, rows, hidden_states) if collector.masks else None
        if collector.batch_rows is None:
            collector.batch_rows, collector.batch_tokens = rows, rows if mask is None else mask.kept
        output = self._routed(plan, hidden_states, top_k_index, top_k_weights, None if mask is None else mask.weights)
        if not plan.checked:
            plan.checked = True
            with torch.no_grad():
                expected = original(hidden_states, top_k_index, top_k_weights)
            self._check_same(plan, output.detach(), expected)
        return output

    def _routed(self, plan: _Plan, hidden_states, top_k_index, top_k_weights, weights):
        """The experts' output; ``weights``: the tokens' mask weights (``None``: every one 1)."""
        module = plan.module
        count = module.num_experts
        index = top_k_index.reshape(hidden_states.shape[0], -1)
        valid = (index >= 0) & (index < count)  # an index of `count` or more is a sentinel (no expert)
        flat = index[valid]
        hits = torch.zeros(count, dtype=torch.float64, device=index.device)
        hits.index_add_(0, flat, torch.ones_like(flat, dtype=torch.float64))
        mass = hits
        if weights is not None:
            per_slot = weights.to(torch.float64)[:, None].expand_as(index)[valid]
            mass = torch.zeros_like(hits).index_add_(0, flat, per_slot)
        hit_list, mass_list = torch.stack([hits, mass]).tolist()  # one host read per experts call
        output = torch.zeros_like(hidden_states)
        first = "gate_up_proj" if module.has_gate else "up_proj"
        for expert in range(count):
            if hit_list[expert] == 0:
                continue
            token_index, slot = torch.where(index == expert)
            x = hidden_states[token_index]
            rows_weights = None if weights is None else weights[token_index]
            tokens = int(round(mass_list[expert]))
            h = self._project(plan, first, expert, x, rows_weights, tokens)
            u = module._apply_gate(h) if module.has_gate else module.act_fn(h)
            o = self._project(plan, "down_proj", expert, u, rows_weights, tokens)
            if getattr(module, "has_post_expert_norm", False):
                o = module.post_expert_norm(o)
            o = o * top_k_weights[token_index, slot, None]
            output.index_add_(0, token_index, o.to(output.dtype))
        return output

    def _project(self, plan: _Plan, parameter: str, expert: int, x, rows_weights, tokens: int):
        """``x W_eᵀ (+ b_e)``, with expert ``e``'s statistics when it is a target."""
        module = plan.module
        weight = getattr(module, parameter)[expert]
        out = x @ weight if module.is_transposed else nn.functional.linear(x, weight)
        if module.has_bias:
            out = out + getattr(module, f"{parameter}_bias")[expert]
        name = plan.names.get(parameter, {}).get(expert)
        if name is None:
            return out
        return self._record(name, x, rows_weights, tokens, out)

    def _record(self, name: str, x, rows_weights, tokens: int, out):
        collector = self.collector
        stats = collector.stats
        flat = x.detach().reshape(-1, x.shape[-1])
        d_in, d_out = flat.shape[1], out.shape[-1]
        group_index = collector.group_of.get(name)
        if group_index is None:  # the first batch that routes a token to this expert
            dtype = _accumulator_dtype(x.dtype, collector.backend, "input_factor")
            group_index = len(stats.groups)
            stats.groups.append(
                InputGroup(members=(name,), input_factor_sum=torch.zeros(d_in, d_in, dtype=dtype, device=x.device))
            )
            dtype = _accumulator_dtype(x.dtype, collector.backend, "gradient")
            collector.group_of[name] = group_index
            stats.routed.add(name)
            with_gradients = not collector.forward_only
            stats.modules[name] = ModuleStatistics(
                name=name,
                group_index=group_index,
                grad_sum=torch.zeros(d_out, d_in, dtype=dtype, device=x.device) if with_gradients else None,
                output_factor_diag_sum=torch.zeros(d_out, dtype=dtype, device=x.device) if with_gradients else None,
            )
        group = stats.groups[group_index]
        with collector.clock.measure():
            collector.backend.accumulate_input_factor(group.input_factor_sum, flat, rows_weights)
        group.num_tokens += tokens
        stats.modules[name].num_tokens += tokens
        if collector.forward_only:
            return out
        anchored = out + collector.anchor.to(out.dtype)
        anchored.register_hook(self._gradient_hook(name, flat, rows_weights))
        return anchored

    def _gradient_hook(self, name: str, rows: torch.Tensor, rows_weights):
        def hook(grad: torch.Tensor) -> None:
            collector = self.collector
            stats = collector.stats.modules[name]
            with collector.clock.measure():
                collector.backend.accumulate_output_statistics(
                    stats.output_factor_diag_sum, stats.grad_sum, grad.reshape(-1, grad.shape[-1]), rows, rows_weights
                )

        return hook

    def _check_same(self, plan: _Plan, output: torch.Tensor, expected) -> None:
        scale = float(expected.detach().abs().max()) if expected.numel() else 0.0
        # fp32/fp64: rounding of a different summation order only; half precision: its unit roundoff
        tolerance = (1e-2 if output.dtype in (torch.float16, torch.bfloat16) else 1e-4) * max(scale, 1e-30)
        if tuple(expected.shape) != tuple(output.shape) or float((output - expected).abs().max()) > tolerance:
            raise ValueError(
                f"experts module '{plan.module_name}' ({type(plan.module).__name__}) computes something other than "
                "transformers' fused experts layout that lora-da reproduces; leave it out of target_modules"
            )


# -- nn.Linear experts in a container (SwitchTransformers) ----------------------------------


def linear_expert_containers(model: nn.Module, targets: Dict[str, object]) -> Dict[str, Tuple[nn.Module, Dict[int, List[str]]]]:
    """``{container name: (container, {expert index: its linear targets})}`` for containers of
    ``nn.Linear`` experts: a module with an int ``num_experts`` and that many children (expert
    ``e`` the ``e``-th), called as ``(hidden_states, routing, weights)``."""
    found = {}
    for name, module in model.named_modules():
        count = getattr(module, "num_experts", None)
        children = list(module.named_children())
        if not isinstance(count, int) or len(children) != count or looks_fused(module):
            continue
        by_expert: Dict[int, List[str]] = {}
        for index, (child_name, _) in enumerate(children):
            prefix = f"{name}.{child_name}." if name else f"{child_name}."
            members = [t for t in targets if t.startswith(prefix) and not isinstance(targets[t], ExpertSlice)]
            if members:
                by_expert[index] = members
        if by_expert:
            found[name] = (module, by_expert)
    return found


def looks_fused(module: nn.Module) -> bool:
    return any(p.dim() == 3 for p in module.parameters(recurse=False))


class LinearExpertRouting:
    """A forward pre-hook on each container of ``nn.Linear`` experts: before the experts run, it
    reads the routing and gives each expert's linear targets the mask of their own rows — the
    routed part of the container's input mask — and its kept count (one host read per call;
    :meth:`lora_da.token_masks.ModuleMasks.route`). The collector then counts each expert's rows
    like any module's; an expert that got no token in a batch is not called and contributes
    nothing (``Collector.routed``)."""

    def __init__(self, collector, containers) -> None:
        self.collector = collector
        self.containers = containers

    def install(self, handles: list) -> None:
        for name, (module, by_expert) in self.containers.items():
            handles.append(module.register_forward_pre_hook(self._hook(name, module, by_expert), with_kwargs=True))

    def _hook(self, name: str, module: nn.Module, by_expert: Dict[int, List[str]]):
        def hook(mod, args, kwargs):
            values = list(args) + list(kwargs.values())
            collector = self.collector
            if not collector.active or collector.masks is None or len(values) < 2:
                return None
            hidden, routing = values[0], values[1]
            rows = hidden.reshape(-1, hidden.shape[-1]).shape[0]
            if routing.dim() == 3 and routing.shape[-1] == module.num_experts:  # one-hot (T, k, E)
                chosen = routing.permute(2, 1, 0) != 0  # (E, k, T), as the container reads it
            elif routing.dim() == 2 and not routing.is_floating_point():  # indices (T, k)
                chosen = torch.stack([(routing == e).T for e in range(module.num_experts)])
            else:
                raise ValueError(
                    f"experts container '{name}' got a routing tensor of shape {tuple(routing.shape)}; expected "
                    f"one-hot (T, k, {module.num_experts}) or indices (T, k)"
                )
            mask = collector.masks.experts_mask(name, rows, hidden)
            weights = None if mask is None else mask.weights
            tokens, kept = {}, []
            for expert in by_expert:
                _, token = torch.where(chosen[expert])  # the container's row order
                tokens[expert] = token
                kept.append(
                    weights[token].sum(dtype=torch.float64)
                    if weights is not None
                    else torch.tensor(float(token.numel()), dtype=torch.float64, device=token.device)
                )
            counts = torch.stack(kept).tolist() if kept else []
            if collector.batch_rows is None:
                collector.batch_rows, collector.batch_tokens = rows, rows if mask is None else mask.kept
            for (expert, members), count in zip(by_expert.items(), counts):
                for member in members:
                    collector.masks.route(member, mask, tokens[expert], int(round(count)))
            return None

        return hook
