"""Reading module names: which layer of a stack a module sits in, and its kind.

A module name is dot-separated; its *layer index* is its first all-digit
component (``model.layers.3.self_attn.q_proj`` → 3). One rule serves the
memory planner (whole layers go in one pass), the batched solves (modules of one
kind, ``model.layers.*.self_attn.q_proj``, sit equally spaced in per-kind
batches) and the report (one line per layer, one panel per module type).
"""

from __future__ import annotations

import re
from typing import Optional

_INDEX = re.compile(r"(?:^|\.)(\d+)(?=\.|$)")  # an all-digit component of a dotted name


def _first_index(name: str) -> Optional[re.Match]:
    return _INDEX.search(name)


def layer_prefix(name: str) -> str:
    """``model.layers.3.self_attn.q_proj`` → ``model.layers.3``; the name itself when it has no index."""
    match = _first_index(name)
    return name[: match.end(1)] if match else name


def layer_index(name: str) -> int:
    """``model.layers.3.self_attn.q_proj`` → 3; -1 when the name has no index."""
    match = _first_index(name)
    return int(match.group(1)) if match else -1


def module_type(name: str) -> str:
    """The last component: ``model.layers.3.self_attn.q_proj`` → ``q_proj``."""
    return name.rsplit(".", 1)[-1]


def module_kind(name: str) -> str:
    """The name with every index starred: ``model.layers.3.mlp.up_proj`` → ``model.layers.*.mlp.up_proj``."""
    return _INDEX.sub(lambda m: m.group(0)[: m.start(1) - m.start(0)] + "*", name)
