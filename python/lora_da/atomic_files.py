"""Files we write for the user: atomically, with the mode the user's umask gives.

``tempfile.mkstemp``/``mkdtemp`` and safetensors create 0600/0700 entries; a file
the user reads from another account, group or container must get what a plain
``open`` would give, ``0666 & ~umask``. :func:`write_atomically` writes beside the
target, fsyncs, sets that mode and renames over the target, so the target holds
either the old file or the whole new one.
"""

from __future__ import annotations

import os
import tempfile
from typing import Callable, Optional


def current_umask() -> int:
    """The process's umask (Linux: read from ``/proc``, leaving it untouched; elsewhere set and restored)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomically(path: str, write: Callable[[str], None], prefix: Optional[str] = None) -> None:
    """``write(temporary)`` into a temporary file beside ``path`` (named ``prefix``…,
    default ``.<name>.tmp-``), fsync it, give it the mode ``0666 & ~umask`` and rename
    it over ``path``. A symlink at ``path`` is replaced, never followed; on any error
    the temporary file is removed and ``path`` is left as it was."""
    directory = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(prefix=prefix or f".{os.path.basename(path)}.tmp-", dir=directory)
    os.close(handle)
    try:
        write(temporary)
        descriptor = os.open(temporary, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        os.chmod(temporary, 0o666 & ~current_umask())
        os.replace(temporary, path)
    except BaseException:
        if os.path.lexists(temporary):
            os.remove(temporary)
        raise
