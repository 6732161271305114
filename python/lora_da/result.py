"""What :func:`lora_da.initialize` returns."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from .config import LoraDAConfig
from .peft_glue import apply_to_peft_model, save_adapter


@dataclass
class ModuleInit:
    """LoRA-DA's initialization of one target module."""

    name: str
    lora_A: torch.Tensor  # r x d_in, float32
    lora_B: torch.Tensor  # d_out x r, float32
    eigenvalues: torch.Tensor  # r smallest eigenvalues of Ω (float64, ascending)
    sigma: float  # σ_max(Δ)
    variance_scale: float  # c = Σ 1/(y+λ) / N / σ²
    damping: float  # λ finally added to Z (see lora_da.method for the escalation rule)
    input_group: Tuple[str, ...]  # modules sharing this module's input factor Z
    # Smallest eigenvalues of Ω beyond the r above, when they were computed
    # (see LoraInit.truncate); None otherwise. Ascending, starts with `eigenvalues`.
    spectrum: Optional[torch.Tensor] = None


@dataclass
class LoraInit:
    """Per-module LoRA factors plus how they were obtained.

    Attributes:
        modules: ``{module name: ModuleInit}``.
        config: the options used.
        train_size: ``N`` used in the variance term.
        num_samples / num_tokens: ``n`` and ``|T|`` of the statistics.
        num_batches / skipped_batches / skipped_samples: loader bookkeeping
            (skipped: the token mask kept nothing / a sample had no label).
        timings: wall seconds per phase: ``forward_backward``,
            ``statistics_accumulate``, ``factor_prep``, ``solve``, ``total``
            (plus ``all_reduce``/``gather`` under ``torch.distributed``).
        backends: which implementation ran each phase.
        passes: passes over the data (more than one only under a ``max_memory`` budget).
        statistics_bytes: peak bytes of the statistics held at once.
    """

    modules: Dict[str, ModuleInit]
    config: LoraDAConfig
    train_size: int
    num_samples: int
    num_tokens: int
    num_batches: int
    skipped_batches: int
    skipped_samples: int
    timings: Dict[str, float] = field(default_factory=dict)
    backends: Dict[str, str] = field(default_factory=dict)
    passes: int = 1
    statistics_bytes: int = 0

    @property
    def input_groups(self) -> List[Tuple[str, ...]]:
        """Groups of modules found to share one input tensor (and one Z)."""
        seen: Dict[Tuple[str, ...], None] = {}
        for module_init in self.modules.values():
            seen.setdefault(module_init.input_group, None)
        return list(seen)

    def truncate(self, rank: int) -> "LoraInit":
        """The rank-``rank`` init contained in this one, keeping every computed
        eigenvalue of Ω in ``ModuleInit.spectrum`` (for the visual report).

        Ω does not depend on the rank, so the rank-``r`` init is the first ``r``
        eigenpairs of a rank-``r + k`` one: ``lora_da.initialize(..., rank=r + k)``
        followed by ``.truncate(r)`` gives the rank-``r`` factors (exactly so
        with the dense solver, to solver tolerance with an iterative one) plus
        the ``k`` next eigenvalues, which show the gap at ``r``.
        """
        if not 1 <= rank <= self.config.rank:
            raise ValueError(f"rank must lie in [1, {self.config.rank}], got {rank}")
        modules = {}
        for name, m in self.modules.items():
            spectrum = m.spectrum if m.spectrum is not None else m.eigenvalues
            modules[name] = dataclasses.replace(
                m,
                lora_A=m.lora_A[:rank].contiguous(),
                lora_B=m.lora_B[:, :rank].contiguous(),
                eigenvalues=m.eigenvalues[:rank].clone(),
                spectrum=spectrum.clone(),
            )
        return dataclasses.replace(self, modules=modules, config=dataclasses.replace(self.config, rank=rank))

    def apply(self, peft_model: nn.Module, adapter_name: str = "default") -> None:
        """Write the factors into the LoRA layers of a PEFT model in place.

        Each module of this init must match exactly one LoRA layer holding
        ``adapter_name`` (by name suffix), with ``lora_A``/``lora_B`` of the
        same shapes. The LoRA parameters keep their dtype and device. With
        ``preserve_output=True`` the base weight ``W`` becomes
        ``W − s·lora_B·lora_A`` (``s`` the layer's scaling), so that the model's
        output is unchanged at init; call ``apply`` once per fresh PEFT model.
        """
        apply_to_peft_model(self, peft_model, adapter_name)

    def save_pretrained(
        self,
        save_directory: str,
        *,
        lora_alpha: Optional[float] = None,
        use_rslora: bool = False,
        base_model_name_or_path: Optional[str] = None,
    ) -> None:
        """Write a PEFT adapter directory that ``PeftModel.from_pretrained`` loads.

        ``lora_alpha`` (PEFT's default when ``None``) and ``use_rslora`` set the
        adapter's scaling ``s``; use the values of your training config. Also
        writes ``lora_da_init.json`` with :meth:`report`. Not available with
        ``preserve_output=True`` (the base weights change).
        """
        save_adapter(
            self,
            save_directory,
            lora_alpha=lora_alpha,
            use_rslora=use_rslora,
            base_model_name_or_path=base_model_name_or_path,
        )

    def report(self) -> dict:
        """A JSON-serializable summary (no tensors but the eigenvalues)."""
        cfg = self.config
        return {
            "method": "lora-da",
            "rank": cfg.rank,
            "alpha": cfg.alpha,
            "beta": cfg.beta,
            "gamma": cfg.gamma,
            "damping": cfg.damping,
            "train_size": self.train_size,
            "token_mask": cfg.token_mask if isinstance(cfg.token_mask, (str, type(None))) else "callable",
            "preserve_output": cfg.preserve_output,
            "num_samples": self.num_samples,
            "num_tokens": self.num_tokens,
            "num_batches": self.num_batches,
            "skipped_batches": self.skipped_batches,
            "skipped_samples": self.skipped_samples,
            "timings_s": dict(self.timings),
            "passes": self.passes,
            "statistics_bytes": self.statistics_bytes,
            "backends": dict(self.backends),
            "input_groups": [list(g) for g in self.input_groups],
            "modules": {
                name: {
                    "d_in": int(m.lora_A.shape[1]),
                    "d_out": int(m.lora_B.shape[0]),
                    "sigma": m.sigma,
                    "variance_scale": m.variance_scale,
                    "damping": m.damping,
                    "eigenvalues": [float(v) for v in m.eigenvalues],
                    **({"spectrum": [float(v) for v in m.spectrum]} if m.spectrum is not None else {}),
                }
                for name, m in self.modules.items()
            },
        }

    def summary(self) -> str:
        """A short human-readable table."""
        lines = [
            f"LoRA-DA init: {len(self.modules)} modules, rank {self.config.rank}, "
            f"{self.num_samples} samples, {self.num_tokens} tokens, train_size {self.train_size}",
            "phases: "
            + ", ".join(f"{phase} {seconds:.3f}s" for phase, seconds in self.timings.items()),
            "backends: " + ", ".join(f"{phase}={backend}" for phase, backend in self.backends.items()),
            f"statistics: {self.passes} pass(es) over the data, peak {self.statistics_bytes / 2**20:.1f} MiB",
        ]
        return "\n".join(lines)
