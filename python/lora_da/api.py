"""``lora_da.initialize``: statistics pass, then the per-module solves."""

from __future__ import annotations

import time
import warnings
from typing import Any, Callable, Dict, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import LoraDAConfig, TargetModules, TokenMask
from .method import InputFactor, lora_da_factors, prepare_input_factor
from .result import LoraInit, ModuleInit
from .solvers import EIGH_BACKEND
from .statistics import KFACStatistics, collect_statistics
from .targets import find_target_modules


def initialize(
    model: nn.Module,
    loader: Any,
    rank: int = 8,
    *,
    target_modules: TargetModules = None,
    alpha: float = 1.0,
    beta: float = 0.03,
    gamma: float = 1024.0,
    damping: float = 1e-6,
    train_size: Optional[int] = None,
    token_mask: TokenMask = "attention",
    loss_fn: Optional[Callable[[nn.Module, Any], torch.Tensor]] = None,
    max_batches: Optional[int] = None,
    preserve_output: bool = False,
    seed: int = 0,
    progress: bool = True,
) -> LoraInit:
    """Compute LoRA-DA's data-aware LoRA initialization of ``model``.

    One hooked forward+backward pass per batch of ``loader`` gathers, for every
    target module, the gradient ``G``, the input factor ``Z`` (shared by modules
    fed the same input tensor) and the diagonal output factor ``y``; then each
    module's Initialization Guidance Matrix Ω is built and its ``rank`` smallest
    eigenvectors give ``lora_A`` and ``lora_B`` (math: ``lora_da.method``).

    Args:
        model: any ``nn.Module``; left exactly as found (hooks, ``training``,
            ``requires_grad``), also when this raises.
        loader: an iterable of batches. With the default loss, dict-like
            batches with ``input_ids``, ``labels`` (-100 = no loss) and
            optionally ``attention_mask``, as for a Hugging Face causal LM.
        rank: LoRA rank ``r``.
        loss_fn: ``loss_fn(model, batch) -> per-sample losses`` (1-D) for
            models that are not causal LMs. Default: each sample's mean
            next-token loss, so results do not depend on the batch size.
        Other arguments: see :class:`lora_da.LoraDAConfig`.

    Returns:
        a :class:`LoraInit`; ``.apply(peft_model)`` or ``.save_pretrained(dir)``.
    """
    config = LoraDAConfig(
        rank=rank,
        target_modules=target_modules,
        alpha=alpha,
        beta=beta,
        gamma=gamma,
        damping=damping,
        train_size=train_size,
        token_mask=token_mask,
        max_batches=max_batches,
        preserve_output=preserve_output,
        seed=seed,
        progress=progress,
        loss_fn=loss_fn,
    )
    return initialize_from_config(model, loader, config)


def initialize_from_config(model: nn.Module, loader: Any, config: LoraDAConfig) -> LoraInit:
    """:func:`initialize` with the options given as a :class:`LoraDAConfig`."""
    start = time.perf_counter()
    modules = find_target_modules(model, config.target_modules, config.rank)
    stats = collect_statistics(
        model,
        loader,
        modules,
        token_mask=config.token_mask,
        loss_fn=config.loss_fn,
        max_batches=config.max_batches,
        progress=config.progress,
    )
    statistics_done = time.perf_counter()

    train_size = config.train_size
    if train_size is None:
        train_size = stats.num_samples
        warnings.warn(
            f"train_size not given: the variance term assumes a fine-tuning set of {train_size} samples "
            "(the calibration set); pass train_size=len(train_dataset)",
            UserWarning,
            stacklevel=3,
        )
    module_inits = solve_modules(stats, config, train_size)
    end = time.perf_counter()
    return LoraInit(
        modules=module_inits,
        config=config,
        train_size=train_size,
        num_samples=stats.num_samples,
        num_tokens=stats.num_tokens,
        num_batches=stats.num_batches,
        skipped_batches=stats.skipped_batches,
        skipped_samples=stats.skipped_samples,
        timings={"statistics": statistics_done - start, "solve": end - statistics_done, "total": end - start},
        backends={"statistics": "torch", "solve": EIGH_BACKEND},
    )


def solve_modules(stats: KFACStatistics, config: LoraDAConfig, train_size: int) -> Dict[str, ModuleInit]:
    """Steps 1-7 of SPEC.md for every module; ``Z`` is factored once per input group."""
    prepared: Dict[int, InputFactor] = {}
    result: Dict[str, ModuleInit] = {}
    bar = tqdm(stats.modules.items(), total=len(stats.modules), desc="lora-da solves", unit="module",
               disable=not config.progress, leave=False)
    for name, module_stats in bar:
        group_index = module_stats.group_index
        group = stats.groups[group_index]
        if group_index not in prepared:
            prepared[group_index] = prepare_input_factor(stats.input_factor(name), config.damping, name)
        input_factor = prepared[group_index]
        factors = lora_da_factors(
            name,
            stats.gradient(name),
            input_factor,
            stats.output_factor_diag(name),
            rank=config.rank,
            alpha=config.alpha,
            beta=config.beta,
            gamma=config.gamma,
            damping=config.damping,
            train_size=train_size,
        )
        result[name] = ModuleInit(
            name=name,
            lora_A=factors.lora_A,
            lora_B=factors.lora_B,
            eigenvalues=factors.eigenvalues,
            sigma=factors.sigma,
            variance_scale=factors.variance_scale,
            damping=input_factor.damping,
            input_group=group.members,
        )
    return result
