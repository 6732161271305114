"""Warnings that point at the user's line, not at lora-da's internals."""

from __future__ import annotations

import sys
import warnings
from typing import Type

_PACKAGE = __name__.split(".")[0]


class LoraDAWarning(Warning):
    """Base of lora-da's own warning categories (``warnings.simplefilter("ignore", LoraDAWarning)``
    silences them, as the CLI's ``--quiet`` does)."""


class DampingWarning(LoraDAWarning, RuntimeWarning):
    """Some input factors Z needed more damping than asked for (docs/math.md §5.1):
    one summary per ``initialize`` call; the per-module values are in the report."""


class TargetsWarning(LoraDAWarning, UserWarning):
    """Default targeting left modules out (output heads, targets smaller than the rank, routers,
    experts it cannot read): one warning per call, listing them."""


def warn_user(message: str, category: Type[Warning] = UserWarning) -> None:
    """``warnings.warn`` with the stack level of the first frame outside this package."""
    level = 2  # stack level 2 is warn_user's caller
    frame = sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] == _PACKAGE:
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)
