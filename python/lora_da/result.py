"""What :func:`lora_da.initialize` returns."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from torch import nn

from .config import LoraDAConfig
from .experts import ExpertEntry
from .memory_peaks import PhaseMemory
from .methods import get_method
from .module_init import ModuleInit
from .peft_glue import apply_to_peft_model, save_adapter

__all__ = ["LoraInit", "ModuleInit"]


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
        memory: peak process memory per phase (:class:`lora_da.memory_peaks.PhaseMemory`:
            RSS on CPU, the CUDA allocator's bytes on CUDA); ``None`` when not measured.
        experts: ``{target name: ExpertEntry}`` of the targets that are experts of fused
            MoE parameters (module, parameter, expert index; :mod:`lora_da.experts`).
        expert_fallbacks: the experts that got fewer than ``rank`` routed tokens and
            PEFT's default init instead (:mod:`lora_da.expert_fallback`).
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
    memory: Optional[PhaseMemory] = None
    experts: Dict[str, ExpertEntry] = field(default_factory=dict)
    expert_fallbacks: List[str] = field(default_factory=list)

    @property
    def method(self) -> str:
        """Which initialization this is (``config.method``)."""
        return self.config.method

    @property
    def modifies_base_weight(self) -> bool:
        """True when :meth:`apply` replaces the base weight ``W`` by ``W − s·lora_B·lora_A``
        (``preserve_output=True``, or a method that does so: pissa, milora, lora-ga)."""
        return bool(self.config.preserve_output) or get_method(self.method).offsets_base_weight

    @property
    def unit_scaling_factors(self) -> bool:
        """True when the stored factors are those for a scaling ``s = 1`` (pissa, milora,
        cntlora): :meth:`apply` and :meth:`save_pretrained` divide both by ``√s``, so
        that ``s·B·A`` is the method's matrix whatever ``lora_alpha``."""
        return get_method(self.method).unit_scaling

    @property
    def ranks(self) -> Dict[str, int]:
        """Each module's rank (they differ between modules for ``cntlora``)."""
        return {name: m.rank for name, m in self.modules.items()}

    @property
    def max_rank(self) -> int:
        """The largest rank of any module (PEFT's ``r``; the others go to ``rank_pattern``)."""
        return max(self.ranks.values())

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
        if self.method != "lora-da":
            raise ValueError(f"truncate is defined for method='lora-da' only, not {self.method!r}")
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
        same shapes (per-module ranks: PEFT's ``rank_pattern``). The LoRA
        parameters keep their dtype and device. When :attr:`unit_scaling_factors`
        both factors are divided by ``√s`` (``s`` the layer's scaling). When
        :attr:`modifies_base_weight` (``preserve_output=True``, pissa, milora,
        lora-ga) the base weight ``W`` becomes ``W − s·lora_B·lora_A`` computed
        from the stored factors, so that the model's output is unchanged at init
        (a base weight that is not floating point is refused by name); call
        ``apply`` once per fresh PEFT model.
        """
        apply_to_peft_model(self, peft_model, adapter_name)

    def save_pretrained(
        self,
        save_directory: str,
        *,
        lora_alpha: Optional[float] = None,
        use_rslora: bool = False,
        base_model_name_or_path: Optional[str] = None,
        task_type: Optional[str] = None,
        fan_in_fan_out: Optional[bool] = None,
        model: Optional[nn.Module] = None,
    ) -> None:
        """Write a PEFT adapter directory that ``PeftModel.from_pretrained`` loads.

        ``lora_alpha`` (PEFT's default when ``None``) and ``use_rslora`` set the
        adapter's scaling ``s``; use the values of your training config.
        ``task_type`` (e.g. ``"CAUSAL_LM"``) is recorded in ``adapter_config.json``;
        ``fan_in_fan_out`` (``None``: True when every target stores its weight
        transposed, GPT-2's ``Conv1D``) is PEFT's flag of that name. With ``task_type``
        ``"SEQ_CLS"``/``"TOKEN_CLS"``/``"QUESTION_ANS"`` PEFT trains the output head in
        full and loads it from the adapter: pass the base ``model``, whose head weights
        are saved with the factors. Every file is
        written atomically with the user's umask. Also
        writes ``lora_da_init.json`` with :meth:`report`. Per-module ranks are
        written as PEFT's ``rank_pattern``.

        When :attr:`modifies_base_weight` the directory holds the init's factors
        (as :meth:`apply` writes them) for the *offset* base ``W − s·B·A``, and
        ``lora_da_init.json`` says so (``"base_weight": "offset"``): load it with
        :func:`lora_da.peft_glue.load_init_adapter`, which applies the offset to
        the unmodified base (``PeftModel.from_pretrained`` alone would not).
        After training, :func:`lora_da.peft_glue.save_as_plain_lora` writes a
        plain adapter for the unmodified base.
        """
        save_adapter(
            self,
            save_directory,
            lora_alpha=lora_alpha,
            use_rslora=use_rslora,
            base_model_name_or_path=base_model_name_or_path,
            task_type=task_type,
            fan_in_fan_out=fan_in_fan_out,
            model=model,
        )

    def report(self) -> dict:
        """A JSON-serializable summary (no tensors but the eigenvalues)."""
        cfg = self.config
        return {
            "method": cfg.method,
            "method_options": dataclasses.asdict(cfg.options),
            "base_weight": "offset: W - s*lora_B*lora_A" if self.modifies_base_weight else "unchanged",
            "factors_for_unit_scaling": self.unit_scaling_factors,
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
            "memory_bytes": self.memory.as_dict() if self.memory is not None else None,
            "backends": dict(self.backends),
            "input_groups": [list(g) for g in self.input_groups],
            "experts": {name: dataclasses.asdict(entry) for name, entry in self.experts.items()},
            "expert_fallbacks": list(self.expert_fallbacks),
            "modules": {
                name: {
                    "rank": m.rank,
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
        ranks = sorted(set(self.ranks.values()))
        rank_text = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}..{ranks[-1]} per module"
        title = "LoRA-DA" if self.method == "lora-da" else self.method
        lines = [
            f"{title} init: {len(self.modules)} modules, {rank_text}, "
            f"{self.num_samples} samples, {self.num_tokens} tokens, train_size {self.train_size}",
            "base weights: "
            + ("W - s*lora_B*lora_A at apply() (output unchanged at init)" if self.modifies_base_weight else "unchanged"),
            "phases: "
            + ", ".join(f"{phase} {seconds:.3f}s" for phase, seconds in self.timings.items()),
            "backends: " + ", ".join(f"{phase}={backend}" for phase, backend in self.backends.items()),
            f"statistics: {self.passes} pass(es) over the data, peak {self.statistics_bytes / 2**20:.1f} MiB",
        ]
        if self.memory is not None:
            lines.append(self.memory.summary())
        if self.experts or self.expert_fallbacks:
            lines.append(
                f"experts: {len(self.experts)} fused expert matrices, {len(self.expert_fallbacks)} experts with fewer than "
                f"rank routed tokens (PEFT's default init)"
            )
        return "\n".join(lines)
