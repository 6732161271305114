"""LoRA-DA computed the way the published implementation does it.

Written plainly from that implementation's structure (the math is docs/math.md's,
steps 1-7), as the reference point of ``bench/bench_init_overhead.py``; it is not
part of the library:

1. a separate gradient pass with every parameter trainable (``loss.backward()``,
   ``G`` read from ``weight.grad``);
2. one more forward+backward pass per group of 8 layers, with forward hooks that
   keep each target module's input and full backward hooks that receive its
   output gradient; ``Z`` and ``y`` accumulated with fp32 ``addmm`` on the rows
   that a boolean index of the token mask gathers (one ``Z`` per module);
3. per module: an explicit ``Z⁻¹``, ``Δ``, ``σ``, ``c`` and a dense Ω;
4. ``torch.lobpcg(Ω, k=r, largest=False, niter=10)``, one module at a time.

Steps 3-4 run in float64 (the published code's fp32 inverse of a Z with
condition number 1e8 would not give comparable factors); that makes the baseline
slower than an fp32 version by at most the time of those two steps, which the
benchmark reports separately.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Dict, List

import torch
from torch import nn

from lora_da.losses import as_causal_lm_batch, causal_lm_per_sample_loss, token_mask_for
from lora_da.solvers import fix_column_signs
from lora_da.targets import find_target_modules
from timing import Timer

LAYERS_PER_PASS = 8


@dataclass
class BaselineResult:
    """Per-module float64 factors of the published algorithm, and its phase times."""

    lora_A: Dict[str, torch.Tensor] = field(default_factory=dict)  # r x d_in
    lora_B: Dict[str, torch.Tensor] = field(default_factory=dict)  # d_out x r
    guidance: Dict[str, torch.Tensor] = field(default_factory=dict)  # Ω (float64), kept for the eigh oracle
    timings: Dict[str, float] = field(default_factory=dict)
    passes: int = 0


def _layer_of(name: str) -> int:
    match = re.search(r"\.(\d+)\.", name)
    return int(match.group(1)) if match else 0


def _gradient_pass(model: nn.Module, loader: List[dict], modules: Dict[str, nn.Module]) -> Dict[str, torch.Tensor]:
    """``G = (1/n) Σ_samples ∇_W ℓ_sample`` from ``weight.grad``, all parameters trainable."""
    model.zero_grad(set_to_none=True)
    num_samples = 0
    for batch in loader:
        losses = causal_lm_per_sample_loss(model, as_causal_lm_batch(batch))
        losses.sum().backward()
        num_samples += losses.numel()
    gradients = {name: module.weight.grad.detach().clone() / num_samples for name, module in modules.items()}
    model.zero_grad(set_to_none=True)
    return gradients


def _factor_pass(model: nn.Module, loader: List[dict], modules: Dict[str, nn.Module], token_mask: str):
    """One forward+backward over the data for ``modules``: Σ a aᵀ and Σ g ⊙ g per module,
    accumulated in fp32 on each module's own device (that of its weight)."""
    input_sums = {
        name: torch.zeros(m.in_features, m.in_features, device=m.weight.device) for name, m in modules.items()
    }
    output_sums = {name: torch.zeros(m.out_features, device=m.weight.device) for name, m in modules.items()}
    inputs: Dict[str, torch.Tensor] = {}
    current_mask: List[torch.Tensor] = []
    handles = []

    def forward_hook(name):
        def hook(module, args, output):
            inputs[name] = args[0].detach()

        return hook

    def backward_hook(name):
        def hook(module, grad_input, grad_output):
            mask = current_mask[0]
            rows = inputs.pop(name)[mask].float()  # boolean gather of the valid tokens
            grads = grad_output[0][mask].float()
            input_sums[name].addmm_(rows.T, rows)
            output_sums[name].add_((grads * grads).sum(dim=0))

        return hook

    for name, module in modules.items():
        handles.append(module.register_forward_hook(forward_hook(name)))
        handles.append(module.register_full_backward_hook(backward_hook(name)))
    num_tokens = 0
    try:
        for batch in loader:
            batch = as_causal_lm_batch(batch)
            mask = token_mask_for(batch, token_mask)
            if mask is None:
                mask = torch.ones(batch["input_ids"].shape, dtype=torch.bool, device=batch["input_ids"].device)
            current_mask[:] = [mask.bool().to(batch["input_ids"].device)]
            num_tokens += int(mask.sum())
            losses = causal_lm_per_sample_loss(model, batch)
            losses.sum().backward()
        model.zero_grad(set_to_none=True)
    finally:
        for handle in handles:
            handle.remove()
    return input_sums, output_sums, num_tokens


def published_initialize(
    model: nn.Module,
    loader: List[dict],
    rank: int = 8,
    *,
    alpha: float = 1.0,
    beta: float = 0.03,
    gamma: float = 1024.0,
    damping: float = 1e-6,
    train_size: int,
    token_mask: str = "attention",
    niter: int = 10,
    seed: int = 0,
) -> BaselineResult:
    """LoRA-DA by the published recipe; the model must be a causal LM (HF batches)."""
    result = BaselineResult()
    device = next(model.parameters()).device  # timings wait for its queued work
    modules = find_target_modules(model, None, rank)
    flags = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    model.eval()
    try:
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        with Timer(device) as timer:
            gradients = _gradient_pass(model, loader, modules)
        result.timings["gradient pass"] = timer.seconds

        input_sums: Dict[str, torch.Tensor] = {}
        output_sums: Dict[str, torch.Tensor] = {}
        with Timer(device) as timer:
            layers = sorted({_layer_of(name) for name in modules})
            for first in range(0, len(layers), LAYERS_PER_PASS):
                chunk = set(layers[first : first + LAYERS_PER_PASS])
                subset = {name: m for name, m in modules.items() if _layer_of(name) in chunk}
                z, y, num_tokens = _factor_pass(model, loader, subset, token_mask)
                input_sums.update(z)
                output_sums.update(y)
                result.passes += 1
        result.timings["factor passes"] = timer.seconds
    finally:
        for parameter, flag in zip(model.parameters(), flags):
            parameter.requires_grad_(flag)
        model.train(was_training)

    prep_seconds = solve_seconds = 0.0
    # torch.lobpcg draws its start block from the global generator of Ω's device: seed it, and
    # leave the caller's generators (CPU, and the CUDA device's) as they were
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for name in modules:
            with Timer(device) as timer:
                d_in = input_sums[name].shape[0]
                eye = torch.eye(d_in, dtype=torch.float64, device=input_sums[name].device)
                input_factor = input_sums[name].double() / num_tokens + damping * eye
                input_factor_inverse = torch.linalg.inv(input_factor)  # explicit Z⁻¹
                inverse_output = 1.0 / (output_sums[name].double() / num_tokens + damping)
                gradient = gradients[name].double()
                delta = -(input_factor_inverse @ gradient.T) * inverse_output  # Δ = −Z⁻¹Gᵀ diag(1/(y+λ))
                sigma = float(torch.linalg.matrix_norm(delta, ord=2))
                delta_hat = delta / sigma
                variance_scale = float(inverse_output.sum()) / train_size / sigma**2
                guidance = -alpha * delta_hat @ delta_hat.T + beta * variance_scale * input_factor_inverse
                guidance = (guidance + guidance.T) / 2
            prep_seconds += timer.seconds

            with Timer(device) as timer:
                _, vectors = torch.lobpcg(guidance, k=rank, largest=False, niter=niter)
            solve_seconds += timer.seconds
            vectors = fix_column_signs(vectors)
            lora_a0 = vectors  # d_in x r
            lora_b0 = vectors.T @ delta_hat  # r x d_out
            result.lora_A[name] = lora_a0.T / math.sqrt(gamma)
            result.lora_B[name] = lora_b0.T / math.sqrt(gamma)
            result.guidance[name] = guidance
    result.timings["factor prep"] = prep_seconds
    result.timings["solve"] = solve_seconds
    result.timings["total"] = sum(result.timings.values())
    return result


def eigh_subspace(guidance: torch.Tensor, rank: int) -> torch.Tensor:
    """The exact r smallest eigenvectors of Ω (the oracle for the baseline's ``torch.lobpcg``)."""
    return torch.linalg.eigh(guidance)[1][:, :rank]


def module_type(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def largest_angle(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest principal angle (radians) between the column spans of ``a`` and ``b``."""
    qa, _ = torch.linalg.qr(a.to(torch.float64))
    qb, _ = torch.linalg.qr(b.to(torch.float64))
    return float(torch.arccos(torch.linalg.svdvals(qa.T @ qb).clamp(max=1.0).min()))


__all__ = ["BaselineResult", "published_initialize", "eigh_subspace", "largest_angle", "module_type"]
