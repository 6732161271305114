"""The process memory of :func:`lora_da.initialize`, per phase (``LoraInit.memory``).

What is measured: on CPU the process's resident set (RSS), on CUDA the bytes
the caching allocator handed out on the model's device
(``torch.cuda.memory_allocated``). Nothing global is reset (not the process's
peak RSS, not CUDA's peak statistics), so that a caller's own measurement is
left alone. Per phase the peak is:

* exact when the phase raised the process's peak so far (``getrusage``'s
  ``ru_maxrss``, ``torch.cuda.max_memory_allocated``): the new peak;
* otherwise the largest value a background thread sampled every
  :data:`SAMPLE_SECONDS` during the phase (and the values at its ends): a lower
  bound of the phase's true peak, which is then below the earlier peak anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import threading
from dataclasses import asdict, dataclass
from typing import Dict, Optional

import torch

try:  # not on Windows
    import resource
except ImportError:  # pragma: no cover - exotic platforms
    resource = None  # type: ignore[assignment]

SAMPLE_SECONDS = 0.005
PHASES = ("statistics_pass", "factor_prep", "solve")


def _page_size() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        return 4096


_PAGE = _page_size()


def current_rss() -> int:
    """The process's resident set now, in bytes (0 where ``/proc`` is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


def peak_rss() -> int:
    """The process's peak resident set so far, in bytes (``ru_maxrss``)."""
    if resource is None:  # pragma: no cover
        return current_rss()
    value = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return value if sys.platform == "darwin" else value * 1024  # macOS: bytes; Linux: KiB


def _load_malloc_trim():
    """glibc's ``malloc_trim`` (``None`` elsewhere: musl, macOS, Windows)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_MALLOC_TRIM = _load_malloc_trim()


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc ``malloc_trim(0)``; a no-op
    elsewhere). The statistics pass frees a batch's activations in many chunks smaller than
    glibc's mmap threshold: they stay resident in the heap, while the float64 preparation
    allocates large blocks by fresh ``mmap`` and cannot reuse them. Frees nothing in use."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


@dataclass(frozen=True)
class PhaseMemory:
    """Peak bytes per phase of one ``initialize`` call (0 for a phase that did not run).

    Attributes:
        measure: ``"rss"`` (CPU: the process's resident set) or
            ``"cuda_allocated"`` (CUDA: the allocator's bytes on the model's device).
        start: the value when the call began (the model, the loader, the caller's data).
        statistics_pass: peak during the statistics pass(es) (hooks, activations, sums,
            checkpoint saves, all-reduce).
        factor_prep: peak during the methods' float64 preparation.
        solve: peak during the solves (and whatever a method does not book as prep).
        total: peak over the whole call; ``total - start`` is what the call added.
    """

    measure: str
    start: int
    statistics_pass: int
    factor_prep: int
    solve: int
    total: int

    def as_dict(self) -> Dict[str, object]:
        return asdict(self)

    def summary(self) -> str:
        """One line: ``memory (peak rss): start 0.6 GiB, statistics_pass 1.2 GiB, ...``."""
        parts = [f"{key} {_gib(getattr(self, key))}" for key in ("start", *PHASES, "total")]
        return f"memory (peak {self.measure}): " + ", ".join(parts)


def _gib(count: int) -> str:
    return f"{count / 2**30:.2f} GiB"


class PhasePeaks:
    """Tracks the peak memory of consecutive phases; :meth:`mark` ends one.

    Use as a context manager (it starts and stops the sampling thread)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self.start = self.current()
        self.peaks: Dict[str, int] = {}
        self._interval_peak = self.start
        self._interval_process_peak = self.process_peak()
        self._call_process_peak = self._interval_process_peak
        self._call_max = self.start
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def current(self) -> int:
        if self.cuda:
            return int(torch.cuda.memory_allocated(self.device))
        return current_rss()

    def process_peak(self) -> int:
        if self.cuda:
            return int(torch.cuda.max_memory_allocated(self.device))
        return peak_rss()

    def _sample(self) -> None:
        value = self.current()
        with self._lock:
            self._interval_peak = max(self._interval_peak, value)
            self._call_max = max(self._call_max, value)

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_SECONDS):
            self._sample()

    def __enter__(self) -> "PhasePeaks":
        self._thread = threading.Thread(target=self._run, name="lora-da-memory", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def mark(self, phase: str) -> None:
        """End the interval since the last mark (or the start), counting it to ``phase``."""
        self._sample()
        peak = self.process_peak()
        with self._lock:
            value = peak if peak > self._interval_process_peak else self._interval_peak
            self.peaks[phase] = max(self.peaks.get(phase, 0), value)
            self._interval_peak = self.current()
            self._interval_process_peak = peak

    def result(self) -> PhaseMemory:
        """The peaks so far (call after the last :meth:`mark`)."""
        self._sample()
        peak = self.process_peak()
        total = peak if peak > self._call_process_peak else self._call_max
        total = max([total, self.start, *self.peaks.values()])
        return PhaseMemory(
            measure="cuda_allocated" if self.cuda else "rss",
            start=self.start,
            total=total,
            **{phase: self.peaks.get(phase, 0) for phase in PHASES},
        )


class PhaseTimings(dict):
    """``timings`` whose writes of a phase's seconds also end that phase's memory
    interval: :class:`lora_da.methods.base.PhaseClock` books ``factor_prep`` and
    ``solve`` as it goes, so the memory follows the same boundaries."""

    def __init__(self, phases, peaks: PhasePeaks, tracked=("factor_prep", "solve")) -> None:
        super().__init__({phase: 0.0 for phase in phases})
        self.peaks = peaks
        self.tracked = set(tracked)

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        if key in self.tracked:
            self.peaks.mark(key)


__all__ = ["PhaseMemory", "PhasePeaks", "PhaseTimings", "current_rss", "peak_rss", "release_free_memory"]
