"""``lora_da.initialize``: the public entry point; the work is :func:`lora_da.pipeline.run`."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Union

import torch
from torch import nn

from . import pipeline
from .config import LoraDAConfig, TargetModules, TokenMask
from .result import LoraInit


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
    stats_backend: str = "auto",
    statistics_precision: str = "auto",
    gather_to: Optional[int] = None,
    stats_checkpoint: Optional[str] = None,
    checkpoint_every: int = 50,
    solver: str = "auto",
    max_memory: Union[None, int, float] = None,
    method: str = "lora-da",
    method_options: Optional[Mapping[str, float]] = None,
) -> LoraInit:
    """Compute LoRA-DA's data-aware LoRA initialization of ``model``.

    One hooked forward+backward pass per batch of ``loader`` gathers, for every
    target module, the gradient ``G``, the input factor ``Z`` (shared by modules
    fed the same input tensor) and the diagonal output factor ``y``; then each
    module's Initialization Guidance Matrix Ω is built and its ``rank`` smallest
    eigenvectors give ``lora_A`` and ``lora_B`` (math: docs/math.md, steps 1-7).

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
        solver: ``"auto"`` (the compiled batched LOBPCG, all same-shape modules
            in one call) or ``"eigh"`` (dense float64 ``torch.linalg.eigh``, the oracle).
        stats_backend: ``"auto"`` (Triton kernels on CUDA, PyTorch elsewhere),
            ``"torch"`` or ``"triton"``; ``result.backends["statistics"]`` says which ran.
        statistics_precision: ``"auto"`` (PyTorch backend: Z in float64, G and y in
            float32), ``"float32"`` or ``"float64"`` (see :class:`LoraDAConfig`, docs/math.md §5.6).
        gather_to: under ``torch.distributed``, the rank that receives every
            module's factors (``None``: all ranks do; other ranks then return
            only the modules they solved).
        max_memory: budget for the statistics held at once plus the solve's working set (bytes, or a
            fraction of free device memory; default half of it). The whole
            model's statistics go in one pass when they fit; otherwise the
            layers are split over several passes (``result.passes``).
        method: ``"lora-da"`` (default), or one of the other initializations
            computed from the same statistics pass (``"lora"``, ``"pissa"``,
            ``"milora"``, ``"lora-ga"``, ``"lora-one"``, ``"cntlora"``,
            ``"fisher-subspace"``; criteria in :mod:`lora_da.methods` and
            docs/math.md §6). Each collects only what it needs:
            ``lora``/``pissa``/``milora`` take ``loader=None``, ``cntlora`` runs
            forward passes only. ``max_memory``, checkpoints and
            ``torch.distributed`` serve every method.
        method_options: method-specific options: the fields of the method's options
            dataclass (e.g. ``{"stable_gamma": 16}`` for lora-ga, ``lora_da.methods.lora_ga.LoraGAOptions``).
        Other arguments: see :class:`lora_da.LoraDAConfig`.

    Returns:
        a :class:`LoraInit`; ``.apply(peft_model)`` or ``.save_pretrained(dir)``.
        ``result.timings`` has the seconds of each phase: ``forward_backward``
        (the model's own passes), ``statistics_accumulate`` (Z, y, G inside the
        pass), ``factor_prep`` (float64 Cholesky, Δ, σ, preconditioners),
        ``solve`` (eigensolves) and ``total``; ``result.statistics_bytes`` the
        peak memory of the statistics.
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
        stats_backend=stats_backend,
        statistics_precision=statistics_precision,
        gather_to=gather_to,
        stats_checkpoint=stats_checkpoint,
        checkpoint_every=checkpoint_every,
        solver=solver,
        max_memory=max_memory,
        method=method,
        method_options=method_options,
    )
    return initialize_from_config(model, loader, config)


def initialize_from_config(model: nn.Module, loader: Any, config: LoraDAConfig) -> LoraInit:
    """:func:`initialize` with the options given as a :class:`LoraDAConfig`.

    Under ``torch.distributed`` (an initialized process group of more than one
    rank) every rank must call this with its own share of the data; see
    :mod:`lora_da.distributed`.
    """
    return pipeline.run(model, loader, config)
