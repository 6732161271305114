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
A method file defines ``METHOD = register(Method(...))`` (:class:`lora_da.methods.base.Method`);
adding a method is that file plus one import line below.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from .base import METHODS, Method

# The registry: importing a method's file registers its METHOD, in this order
# (the order the command line lists them). Adding a method is its file plus one line here.
from . import lora_da  # noqa: F401 (registers it)
from . import lora  # noqa: F401 (registers it)
from . import pissa  # noqa: F401 (registers it)
from . import milora  # noqa: F401 (registers it)
from . import lora_ga  # noqa: F401 (registers it)
from . import lora_one  # noqa: F401 (registers it)
from . import cntlora  # noqa: F401 (registers it)
from . import fisher_subspace  # noqa: F401 (registers it)


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
