"""One module's initialization: :class:`ModuleInit`, and the one place factors are finished.

Every method hands its factors to :func:`make_module_init`, which casts them to
float32 and refuses non-finite values by module name, so that no NaN/Inf ever
reaches a PEFT model silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch


@dataclass
class ModuleInit:
    """The initialization of one target module.

    For ``method="lora-da"`` the fields are as commented. For the other methods
    ``eigenvalues`` holds the singular values of the matrix the method decomposes
    (W, G, ΔW or the Fisher-whitened gradient; empty for ``lora``), ``sigma`` its
    largest one, ``variance_scale`` is 0, and the rank ``lora_A.shape[0]`` may
    differ between modules (``cntlora``). See docs/math.md §3 and §6.
    """

    name: str
    lora_A: torch.Tensor  # r x d_in, float32
    lora_B: torch.Tensor  # d_out x r, float32
    eigenvalues: torch.Tensor  # r smallest eigenvalues of Ω (float64, ascending)
    sigma: float  # σ_max(Δ)
    variance_scale: float  # c = Σ 1/(y+λ) / N / σ²
    damping: float  # λ finally added to Z (docs/math.md §5.1: the escalation rule)
    input_group: Tuple[str, ...]  # modules sharing this module's input factor Z
    # Smallest eigenvalues of Ω beyond the r above, when they were computed
    # (see LoraInit.truncate); None otherwise. Ascending, starts with `eigenvalues`.
    spectrum: Optional[torch.Tensor] = None
    # The target stores W as d_in x d_out (GPT-2 Conv1D): PEFT's fan_in_fan_out.
    transposed_weight: bool = False

    @property
    def rank(self) -> int:
        """This module's LoRA rank."""
        return int(self.lora_A.shape[0])


def make_module_init(
    name: str,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    values: torch.Tensor,
    sigma: float,
    *,
    variance_scale: float = 0.0,
    damping: float = 0.0,
    input_group: Optional[Tuple[str, ...]] = None,
) -> ModuleInit:
    """A :class:`ModuleInit` with float32 factors; ``FloatingPointError`` naming the
    module when a factor is not finite. ``values``: the method's eigen/singular values."""
    lora_A = lora_A.to(torch.float32).contiguous()
    lora_B = lora_B.to(torch.float32).contiguous()
    if not (torch.isfinite(lora_A).all() and torch.isfinite(lora_B).all()):
        raise FloatingPointError(f"LoRA factors of module '{name}' are not finite")
    return ModuleInit(
        name=name,
        lora_A=lora_A,
        lora_B=lora_B,
        eigenvalues=values.detach().to(torch.float64).cpu(),
        sigma=float(sigma),
        variance_scale=float(variance_scale),
        damping=float(damping),
        input_group=input_group or (name,),
    )
