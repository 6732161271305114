"""Timing helpers shared by the bench scripts.

* :class:`Timer`: ``with Timer(device) as t: ...`` then ``t.seconds``: wall-clock seconds
  (``time.perf_counter``); on a CUDA device the queued GPU work is waited for at both
  ends, so the time covers the work the block launched, not just its launch.
* :func:`timed`: warm-up runs, then ``repeat`` timed runs of ``fn()``; returns a
  :class:`Timing` (median, best, every run).
* :func:`markdown_table` / :func:`markdown_row`: the result tables.

Scripts in ``bench/`` import it as ``from timing import ...`` (``python bench/<script>.py``
puts ``bench/`` on ``sys.path``).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Union

import torch

Device = Union[None, str, torch.device]


def synchronizer(device: Device) -> Callable[[], None]:
    """``torch.cuda.synchronize`` for a CUDA device, a no-op for anything else (or None)."""
    if device is not None and torch.device(device).type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


class Timer:
    """Seconds spent in a ``with`` block (``perf_counter``; CUDA work waited for at both ends).

    ``seconds`` is set when the block exits (also when it raises).
    """

    def __init__(self, device: Device = None) -> None:
        self._sync = synchronizer(device)
        self._start: Optional[float] = None
        self.seconds: float = float("nan")

    def __enter__(self) -> "Timer":
        self._sync()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self._sync()
        self.seconds = time.perf_counter() - self._start


@dataclass(frozen=True)
class Timing:
    """Seconds of each timed run of one function."""

    runs: List[float]

    @property
    def median(self) -> float:
        return statistics.median(self.runs)

    @property
    def best(self) -> float:
        return min(self.runs)


def timed(fn: Callable[[], object], *, repeat: int = 5, warmup: int = 1, device: Device = None) -> Timing:
    """Run ``fn()`` ``warmup`` times untimed, then ``repeat`` times, each in a :class:`Timer`."""
    if repeat < 1:
        raise ValueError(f"repeat must be at least 1, got {repeat}")
    for _ in range(warmup):
        fn()
    runs = []
    for _ in range(repeat):
        with Timer(device) as timer:
            fn()
        runs.append(timer.seconds)
    return Timing(runs)


def markdown_row(cells: Sequence[object]) -> str:
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table; every row must have one cell per header."""
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"a table row has {len(row)} cells for {len(headers)} columns: {row!r}")
    lines = [markdown_row(headers), "|" + "---|" * len(headers)]
    lines += [markdown_row(row) for row in rows]
    return "\n".join(lines)
