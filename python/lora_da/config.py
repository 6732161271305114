"""Options of a LoRA-DA initialization, as one frozen dataclass (like PEFT's configs)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch

from .methods import resolve_options

TokenMask = Union[str, None, Callable[[object], torch.Tensor]]
TargetModules = Union[None, str, Sequence[str]]

TOKEN_MASK_MODES = ("attention", "labels", "all")

# The seeds every consumer accepts: the compiled core's uint64 and torch.Generator.manual_seed
# (which also takes negative ints, but maps them onto this range).
MAX_SEED = 2**64 - 1


def _is_int(value: object) -> bool:
    """An int that is not a bool (``True`` is an int to Python, never a count to us)."""
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class LoraDAConfig:
    """Hyper-parameters of LoRA-DA (defaults as published; symbols as in docs/math.md).

    Attributes:
        rank: LoRA rank ``r``.
        target_modules: ``None`` for every ``nn.Linear`` except the output head;
            a list of names (a module matches when its name equals an entry or ends
            with ``"." + entry``, as in PEFT); or one string, a regular expression
            that must match the whole module name.
        alpha: weight ``α`` of the bias term ``−α Δ̂Δ̂ᵀ`` of Ω.
        beta: weight ``β`` of the variance term ``β c Z⁻¹`` of Ω.
        gamma: ``γ``; ``lora_A = A₀ᵀ/√γ`` and ``lora_B = B₀ᵀ/√γ``.
        damping: ``λ``, added to ``Z``'s diagonal and to ``y``.
        train_size: ``N``, the size of the fine-tuning set (variance term).
            ``None`` uses the number of calibration samples, with a warning.
        token_mask: which tokens enter ``Z`` and ``y``: ``"attention"``
            (``attention_mask == 1``, all tokens when the batch has none),
            ``"labels"`` (tokens whose next-token label is not -100),
            ``"all"``, or a callable ``batch -> mask`` shaped like the inputs'
            leading dimensions (0/1, or finite non-negative token weights).
        max_batches: stop after this many batches from the loader.
        preserve_output: subtract ``s·lora_B·lora_A`` from the base weight in
            :meth:`LoraInit.apply` so the model's output is unchanged at init.
        seed: seed for any randomized step (solver start vectors, ``lora``'s
            random ``lora_A``): an int in ``[0, 2**64 - 1]``.
        stats_backend: who accumulates the statistics: ``"auto"`` (Triton kernels
            on CUDA, the PyTorch reference elsewhere), ``"torch"`` or ``"triton"``.
        statistics_precision: the accumulators' precision (docs/math.md §5.6):
            ``"auto"`` (default: the PyTorch backend sums Z in float64 and G, y
            in float32, which keeps ill-conditioned inputs exact; the Triton
            kernels sum everything in float32), ``"float32"`` (everything in
            float32: Z costs half as much, but an input with cond(Z) ≳ 1e7 loses
            Z's small eigenvalues, the damping escalates and A₀ can turn by tens
            of degrees) or ``"float64"`` (everything in float64, PyTorch backend
            only: G's products cost about twice as much; for inputs so
            ill-conditioned that G's float32 rounding, divided by Z's smallest
            eigenvalues, shows).
        solver: eigensolver for Ω's r smallest eigenpairs: ``"auto"`` (the
            compiled batched LOBPCG on the operator form of Ω, all same-shape
            modules in one call) or ``"eigh"`` (dense ``torch.linalg.eigh`` in
            float64, the oracle).
        progress: show a progress bar during the statistics pass.
        gather_to: under ``torch.distributed``, the only rank that receives all
            factors (``None``: every rank does).
        stats_checkpoint: a file where the statistics pass saves its sums
            (atomically, every ``checkpoint_every`` batches and at the end) and
            from which a rerun with the same arguments resumes. Under
            ``torch.distributed`` each rank uses ``PATH.rank<k>``.
        checkpoint_every: batches between two checkpoints.
        max_memory: memory budget for the statistics held at once plus the solve's working set: bytes (an
            int), or a fraction (a float in (0, 1]) of the device's free memory
            (CUDA: ``torch.cuda.mem_get_info``; CPU: ``MemAvailable``).
            ``None`` (default) means half of the free memory, which holds the
            whole model's statistics in one pass whenever they fit. When they
            do not, the target modules are split layer by layer into several
            passes over the data (the loader must then be re-iterable), each
            solved and freed before the next; ``result.passes`` says how many ran.
        method: which initialization: ``"lora-da"`` (default) or one of the
            other methods of :mod:`lora_da.methods` (``"lora"``, ``"pissa"``,
            ``"milora"``, ``"lora-ga"``, ``"lora-one"``, ``"cntlora"``,
            ``"fisher-subspace"``). ``alpha``, ``beta`` and ``train_size`` are
            LoRA-DA's; ``fisher-subspace`` uses ``gamma`` and ``damping``.
        method_options: method-specific numbers, the fields of the method's
            options dataclass (e.g. ``lora_da.methods.lora_ga.LoraGAOptions``),
            e.g. ``{"stable_gamma": 16}`` for lora-ga; :attr:`options` holds them resolved.
    """

    rank: int = 8
    target_modules: TargetModules = None
    alpha: float = 1.0
    beta: float = 0.03
    gamma: float = 1024.0
    damping: float = 1e-6
    train_size: Optional[int] = None
    token_mask: TokenMask = "attention"
    max_batches: Optional[int] = None
    preserve_output: bool = False
    seed: int = 0
    progress: bool = True
    gather_to: Optional[int] = None
    stats_checkpoint: Optional[str] = None
    checkpoint_every: int = 50
    max_memory: Union[None, int, float] = None
    stats_backend: str = "auto"
    statistics_precision: str = "auto"
    solver: str = "auto"
    loss_fn: Optional[Callable] = field(default=None, compare=False)
    method: str = "lora-da"
    method_options: Optional[Mapping[str, float]] = field(default=None, compare=False)

    @property
    def options(self) -> Any:
        """The method's options dataclass: ``method_options`` merged into its defaults."""
        return resolve_options(self.method, self.method_options)

    def __post_init__(self) -> None:
        resolve_options(self.method, self.method_options)  # ValueError naming the valid methods
        if self.solver not in ("auto", "eigh"):
            raise ValueError(f"solver must be 'auto' or 'eigh', got {self.solver!r}")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank must be a positive int, got {self.rank!r}")
        for name in ("alpha", "beta", "gamma", "damping"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if self.gamma <= 0:
            raise ValueError(f"gamma must be > 0, got {self.gamma}")
        if self.damping <= 0:
            raise ValueError(f"damping must be > 0, got {self.damping}")
        if self.train_size is not None and (
            not _is_int(self.train_size) or self.train_size < 1
        ):
            raise ValueError(f"train_size must be a positive int or None, got {self.train_size!r}")
        if self.max_batches is not None and (
            not _is_int(self.max_batches) or self.max_batches < 1
        ):
            raise ValueError(f"max_batches must be a positive int or None, got {self.max_batches!r}")
        if isinstance(self.token_mask, str) and self.token_mask not in TOKEN_MASK_MODES:
            raise ValueError(
                f"token_mask must be one of {TOKEN_MASK_MODES}, None or a callable, "
                f"got {self.token_mask!r}"
            )
        if not (self.token_mask is None or isinstance(self.token_mask, str) or callable(self.token_mask)):
            raise ValueError(f"token_mask must be a string, None or a callable, got {self.token_mask!r}")
        if self.stats_backend not in ("auto", "torch", "triton"):
            raise ValueError(f"stats_backend must be 'auto', 'torch' or 'triton', got {self.stats_backend!r}")
        if self.statistics_precision not in ("auto", "float32", "float64"):
            raise ValueError(
                f"statistics_precision must be 'auto', 'float32' or 'float64', got {self.statistics_precision!r}"
            )
        if self.statistics_precision == "float64" and self.stats_backend == "triton":
            raise ValueError("statistics_precision='float64' needs stats_backend='torch' or 'auto' (the Triton kernels sum in float32)")
        if not _is_int(self.seed) or not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be an int in [0, 2**64 - 1], got {self.seed!r}")
        if self.gather_to is not None and (not _is_int(self.gather_to) or self.gather_to < 0):
            raise ValueError(f"gather_to must be a rank (int >= 0) or None, got {self.gather_to!r}")
        if not _is_int(self.checkpoint_every) or self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be a positive int, got {self.checkpoint_every!r}")
        budget = self.max_memory
        if budget is not None:
            if isinstance(budget, bool) or not isinstance(budget, (int, float)):
                raise ValueError(f"max_memory must be bytes (int), a fraction (float) or None, got {budget!r}")
            if isinstance(budget, int) and budget < 1:
                raise ValueError(f"max_memory must be a positive number of bytes, got {budget}")
            if isinstance(budget, float) and not 0.0 < budget <= 1.0:
                raise ValueError(
                    f"max_memory as a float is a fraction of free memory in (0, 1], got {budget} "
                    "(pass an int for bytes)"
                )
        if self.loss_fn is not None and not callable(self.loss_fn):
            raise ValueError("loss_fn must be callable: loss_fn(model, batch) -> per-sample losses")
