"""``milora``: PiSSA with the *minor* (bottom r) singular components of ``W`` (docs/math.md §6.3).

Reads ``W``, no data; the base weight becomes ``W − s·B·A``; factors stored for ``s = 1``.
"""

from __future__ import annotations

from .base import NO_STATISTICS, Method, Solution, SolveContext, register
from .pissa import solve_weight_svd


def solve(context: SolveContext) -> Solution:
    return solve_weight_svd(context, minor=True, label="milora")


METHOD = register(
    Method(
        name="milora",
        solve=solve,
        statistics=NO_STATISTICS,
        reads_weight=True,
        offsets_base_weight=True,
        unit_scaling=True,
    )
)
