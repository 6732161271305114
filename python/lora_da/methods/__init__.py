"""The initialization methods, one file each, and their registry.

==================  =========================  =================  ====================
method              needs                      base weight W      factors given for
==================  =========================  =================  ====================
``lora-da``         G, Z, y (forward+backward) unchanged          any s
``lora``            nothing (no loader)        unchanged          any s (B = 0)
``pissa``           W (no loader)              W − s·B·A          s = 1 (÷√s on apply)
``milora``          W (no loader)              W − s·B·A          s = 1 (÷√s on apply)
``lora-ga``         G (forward+backward)       W − s·B·A          any s
``lora-one``        G (forward+backward)       unchanged          any s
``cntlora``         Z, W (forward only)        unchanged          s = 1 (÷√s on apply)
``fisher-subspace`` G, Z, y (forward+backward) unchanged          any s
==================  =========================  =================  ====================

Each method's exact criterion is in its file's docstring and in docs/math.md §6.
A method file defines ``METHOD = Method(...)`` (:class:`lora_da.methods.base.Method`);
adding a method is that file plus one line in :data:`METHODS` below.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

from . import cntlora, fisher_subspace, lora, lora_da, lora_ga, lora_one, milora, pissa
from .base import Method

#: Every method by name, in the order the command line lists them.
METHODS: Dict[str, Method] = {
    method.name: method
    for method in (
        lora_da.METHOD,
        lora.METHOD,
        pissa.METHOD,
        milora.METHOD,
        lora_ga.METHOD,
        lora_one.METHOD,
        cntlora.METHOD,
        fisher_subspace.METHOD,
    )
}


def get_method(name: str) -> Method:
    """The registered method called ``name`` (``ValueError`` naming the valid ones)."""
    method = METHODS.get(name) if isinstance(name, str) else None
    if method is None:
        raise ValueError(f"method must be one of {', '.join(repr(m) for m in METHODS)}; got {name!r}")
    return method


def resolve_options(name: str, options: Optional[Mapping[str, float]]) -> Any:
    """Method ``name``'s options dataclass with ``options`` merged into its defaults (``ValueError`` when invalid)."""
    return get_method(name).resolve_options(options)


__all__ = ["METHODS", "Method", "get_method", "resolve_options"]
