"""Loads the compiled core ``lora_da._core`` and says how it was built (:func:`build_info`).

The core links ``libscipy_openblas.so`` from the ``scipy-openblas32`` wheel. Its
run path points next to the installed package (``$ORIGIN/../scipy_openblas32/lib``);
when the two packages live in different site directories (virtual environments
with system site packages, editable installs) the library is preloaded here from
``scipy_openblas32.get_lib_dir()`` so that the loader finds it by name.
"""

from __future__ import annotations

import ctypes
import os
from types import ModuleType
from typing import Any, Dict

_core_module = None


def _preload_openblas() -> None:
    try:
        import scipy_openblas32
    except ImportError:  # the run path may still find it
        return
    path = os.path.join(scipy_openblas32.get_lib_dir(), "libscipy_openblas.so")
    if os.path.exists(path):
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)


def core() -> ModuleType:
    """The ``lora_da._core`` extension module (imported on first use)."""
    global _core_module
    if _core_module is None:
        _preload_openblas()
        from . import _core

        _core_module = _core
    return _core_module


def build_info() -> Dict[str, Any]:
    """How the compiled core ``lora_da._core`` in use was built (read from the module itself).

    Keys: ``cuda`` (bool: the CUDA backend is compiled in), ``cuda_requested``
    (``LORA_DA_CUDA`` at configure time: ``"AUTO"``, ``"ON"`` or ``"OFF"``),
    ``cuda_architectures`` (e.g. ``[80, 90]``; ``[]`` without CUDA),
    ``cuda_compiler`` (e.g. ``"NVIDIA 13.0.88"``; None without CUDA), ``cuda_runtime``
    (``"static"``; None without CUDA), ``cxx_compiler`` (e.g. ``"GNU 12.2.0"``),
    ``build_type`` (CMake's, e.g. ``"Release"``), ``blas`` (``"scipy-openblas32"``),
    ``blas_version`` (of the scipy-openblas32 it was built against), ``python``
    (the Python version it was built for), ``version`` (the project's).
    """
    return dict(core().build_info())
