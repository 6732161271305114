"""The ``--out`` directory: checked before any work, written atomically, and
only ever replaced when it holds an earlier lora-da output.

Every output directory holds a marker file, :data:`MARKER_NAME` (a small JSON
object: ``version``, ``command``, ``files``), naming the files lora-da wrote
there. ``--overwrite`` (and the demo) replace a directory only when its marker
lists every entry in it; anything else is refused with a one-line reason.

Writing goes to a temporary sibling ``.NAME.lora-da-tmp-XXXX`` (its marker says
``"complete": false`` until the end). The swap into place is one atomic
``renameat2(RENAME_EXCHANGE)`` on Linux; elsewhere (or on a file system without
it) it is two renames: the old output aside to ``.NAME.lora-da-old-XXXX``, then
the new one in, then the old one removed. A kill between those two renames
leaves no ``--out`` but the old output aside; the next run with the same
``--out`` puts it back (:func:`recover`). A kill at any other moment leaves
``--out`` either as it was or complete, plus possibly a temporary sibling; the
next run removes the temporary siblings that are ours (our prefix, our marker
inside, written by a process that is gone) and never anything else.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
from typing import Any, Dict, Iterable, List, Optional, Set, Union

from ..atomic_files import current_umask
from ..report import JSON_NAME
from .errors import UsageError

logger = logging.getLogger(__name__)

REPLACE_OWN_OUTPUT = "own-output"
MARKER_NAME = ".lora-da-output"
TMP_TAG = ".lora-da-tmp-"
OLD_TAG = ".lora-da-old-"
PROBE_TAG = ".lora-da-probe-"
MARKER_MAX_BYTES = 1 << 16
# What earlier versions wrote (before the marker): such a directory holding only
# these regular files, lora_da_report.json among them, is an earlier output.
LEGACY_NAMES = frozenset(
    {
        "adapter_config.json",
        "adapter_model.safetensors",
        "lora_da_init.json",
        JSON_NAME,
        "lora_da_report.png",
        "lora_da_report.html",
    }
)

_ACTIVE: Set[str] = set()  # this process's staging directories still being written


# -- the marker ------------------------------------------------------------------------


def read_marker(directory: str) -> Optional[Dict[str, Any]]:
    """The marker of a lora-da output in ``directory`` (``None`` when there is
    none: no regular file, too large, or not a JSON object)."""
    path = os.path.join(directory, MARKER_NAME)
    try:
        if os.path.islink(path) or not os.path.isfile(path) or os.path.getsize(path) > MARKER_MAX_BYTES:
            return None
        with open(path, encoding="utf-8") as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and isinstance(marker.get("command"), str) else None


def _write_marker(directory: str, marker: Dict[str, Any]) -> None:
    """Write the marker atomically (a temporary file renamed over it)."""
    path = os.path.join(directory, MARKER_NAME)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(marker, f, indent=1)
    os.replace(tmp, path)


def not_own_output(directory: str) -> Optional[str]:
    """Why ``directory`` is not an earlier lora-da output (``None`` when it is one:
    every entry is a regular file named by its marker, or, without a marker, one
    of the files earlier versions wrote with ``lora_da_report.json`` among them)."""
    try:
        entries = sorted(os.listdir(directory))
    except OSError as error:
        return f"cannot be listed ({error.strerror})"
    marker = read_marker(directory)
    if marker is None:
        if JSON_NAME in entries and set(entries) <= LEGACY_NAMES and _regular_files(directory, entries):
            return None
        return f"is not an earlier lora-da output (no {MARKER_NAME} marker)"
    files = marker.get("files")
    if not isinstance(files, list) or not marker.get("complete", False):
        return f"is not a complete lora-da output ({MARKER_NAME} lists no files)"
    known = {f for f in files if isinstance(f, str)} | {MARKER_NAME}
    foreign = [e for e in entries if e not in known or not _regular_files(directory, [e])]
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        return f"holds {shown}, which lora-da did not write"
    return None


def _regular_files(directory: str, names: Iterable[str]) -> bool:
    for name in names:
        path = os.path.join(directory, name)
        if os.path.islink(path) or not os.path.isfile(path):
            return False
    return True


def _alive(marker: Dict[str, Any], path: str) -> bool:
    """Whether the run that wrote ``marker`` (into the temporary ``path``) may still
    be running: another host's (we cannot tell), or a process of this host that
    exists (this process: while it writes there)."""
    if marker.get("host") != socket.gethostname():
        return True
    pid = marker.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    if pid == os.getpid():
        return path in _ACTIVE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process
        return True
    return True


# -- checks before any work ---------------------------------------------------------------


def _inside(path: str, ancestor: str) -> bool:
    """Whether ``path`` is ``ancestor`` or below it (both real, absolute)."""
    return os.path.commonpath([path, ancestor]) == ancestor


def check_place(out: str, model: Optional[str] = None, data: Optional[str] = None) -> None:
    """Refuse an ``--out`` that is, or contains, the current directory, the model
    directory or the data file's directory, or that lies inside the model
    directory (real paths compared: symbolic links resolved)."""
    real = os.path.realpath(out)
    protected = [("the current directory", os.getcwd())]
    if model:
        protected.append(("the model directory", model))
    if data:
        protected.append(("the data file's directory", os.path.dirname(os.path.abspath(data))))
        protected.append(("the data file's directory", os.path.dirname(os.path.realpath(data))))
    for what, path in protected:
        place = os.path.realpath(path)
        if real == place:
            raise UsageError(f"--out {out} is {what} ({place}); choose a new directory for the output")
        if _inside(place, real):
            raise UsageError(f"--out {out} contains {what} ({place}); choose a new directory for the output")
    if model and _inside(real, os.path.realpath(model)):
        raise UsageError(f"--out {out} is inside the model directory {model}; choose a directory outside it")


def check_parent(out: str, option: str = "--out") -> None:
    """Refuse an ``--out`` (or another ``option``'s path) whose parent cannot be
    created or written: the nearest existing ancestor must be a writable directory
    (``os.access`` and a real probe: a temporary directory made and removed there)."""
    target = os.path.abspath(out)
    base = os.path.dirname(target)
    while not os.path.lexists(base):
        base = os.path.dirname(base)
    if os.path.islink(base) and not os.path.exists(base):
        raise UsageError(f"{option} {out}: {base} is a broken symbolic link")
    if not os.path.isdir(base):
        raise UsageError(f"{option} {out}: {base} is not a directory")
    if not os.access(base, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {out}: cannot write in {base} (permission denied)")
    try:
        probe = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}{PROBE_TAG}", dir=base)
        os.rmdir(probe)
    except OSError as error:
        raise UsageError(f"{option} {out}: cannot create a directory in {base} ({error.strerror or error})") from None


def check_out(
    out: str, overwrite: Union[bool, str], *, model: Optional[str] = None, data: Optional[str] = None
) -> None:
    """Check ``--out`` before any work: not a symbolic link nor a file, not the
    current, model or data directory (:func:`check_place`), a writable parent
    (:func:`check_parent`); then tidy our stale temporary siblings (:func:`recover`)
    and refuse an existing non-empty ``--out`` unless ``overwrite`` (``True`` or
    ``REPLACE_OWN_OUTPUT``) and it is an earlier lora-da output."""
    path = os.path.abspath(out)  # no trailing slash: a link is seen as a link
    if os.path.islink(path):
        if not os.path.exists(path):
            raise UsageError(f"--out {out} is a broken symbolic link")
        raise UsageError(
            f"--out {out} is a symbolic link (to {os.path.realpath(path)}); pass the directory itself"
        )
    if os.path.lexists(path) and not os.path.isdir(path):
        raise UsageError(f"--out {out} is a file" if os.path.isfile(path) else f"--out {out} is not a directory")
    check_place(out, model, data)
    check_parent(out)
    recover(out)
    if not (os.path.isdir(path) and os.listdir(path)):
        return
    if not overwrite:
        raise UsageError(f"--out {out} exists and is not empty; pass --overwrite to replace an earlier lora-da output")
    reason = not_own_output(path)
    if reason:
        raise UsageError(f"--out {out} {reason}; --overwrite replaces only an earlier lora-da output, choose another --out")


# -- stale temporary siblings --------------------------------------------------------------


def _ours(parent: str, name: str) -> List[str]:
    """Our temporary siblings of ``parent/name`` left by runs that are gone: our
    prefix, a directory (not a link) with our marker inside."""
    try:
        entries = os.listdir(parent)
    except OSError:
        return []
    found = []
    for entry in sorted(entries):
        if not (entry.startswith(f".{name}{TMP_TAG}") or entry.startswith(f".{name}{OLD_TAG}")):
            continue
        path = os.path.join(parent, entry)
        if os.path.islink(path) or not os.path.isdir(path):
            continue
        marker = read_marker(path)
        if marker is None or _alive(marker, path):
            continue
        found.append(path)
    return found


def recover(out: str) -> None:
    """Tidy what killed runs left next to ``out``: when ``out`` is missing and an
    earlier output was set aside (a kill between the two renames of a swap), put it
    back; then remove our other temporary siblings. Only directories with our
    prefix and our marker, from a process that is gone, are touched."""
    target = os.path.abspath(out)
    parent, name = os.path.dirname(target), os.path.basename(target)
    stale = _ours(parent, name)
    if not os.path.lexists(target):
        aside = [p for p in stale if OLD_TAG in os.path.basename(p) and not_own_output(p) is None]
        if aside:
            newest = max(aside, key=os.path.getmtime)
            os.replace(newest, target)
            stale.remove(newest)
            logger.warning("put back %s from %s (a run was stopped while replacing it)", out, newest)
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
        if os.path.lexists(path):
            logger.warning("could not remove the stale temporary directory %s", path)
        else:
            logger.info("removed the stale temporary directory %s", path)


# -- the atomic write ------------------------------------------------------------------------


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def exchange(a: str, b: str) -> bool:
    """Swap the paths ``a`` and ``b`` atomically (Linux ``renameat2(RENAME_EXCHANGE)``);
    ``False`` when this system or file system cannot (nothing was changed then)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(code, os.strerror(code), a)


class AtomicDirectory:
    """Write into a temporary sibling of ``target``; :meth:`commit` swaps it into place.

    The sibling holds an incomplete marker from the start, so that a run killed
    while writing leaves something the next run recognises and removes."""

    def __init__(self, target: str, command: str = "lora-da"):
        self.target = os.path.abspath(target)
        self.command = command
        parent = os.path.dirname(self.target)
        os.makedirs(parent, exist_ok=True)
        self.path = tempfile.mkdtemp(prefix=f".{os.path.basename(self.target)}{TMP_TAG}", dir=parent)
        _ACTIVE.add(self.path)
        try:
            os.chmod(self.path, 0o777 & ~current_umask())  # mkdtemp makes it 0700
            _write_marker(self.path, self._marker(complete=False))
        except BaseException:
            self.discard()
            raise

    def _marker(self, complete: bool, files: Optional[List[str]] = None) -> Dict[str, Any]:
        from .. import __version__

        marker: Dict[str, Any] = {
            "version": __version__,
            "command": self.command,
            "complete": complete,
            "pid": os.getpid(),
            "host": socket.gethostname(),
        }
        if files is not None:
            marker["files"] = files
        return marker

    def commit(self) -> None:
        """Move the written directory to ``target``, replacing what was there (only
        an earlier lora-da output or an empty directory, checked again now)."""
        files = sorted(e for e in os.listdir(self.path) if e != MARKER_NAME)
        _write_marker(self.path, self._marker(complete=True, files=files))
        if os.path.islink(self.target) or (os.path.lexists(self.target) and not os.path.isdir(self.target)):
            raise UsageError(f"--out {self.target} became a file or a link during the run; nothing written")
        if not (os.path.isdir(self.target) and os.listdir(self.target)):
            os.replace(self.path, self.target)  # one rename (onto an empty directory too)
            _ACTIVE.discard(self.path)
            return
        reason = not_own_output(self.target)
        if reason:
            raise UsageError(f"--out {self.target} {reason} (it changed during the run); nothing written")
        if exchange(self.path, self.target):
            self._remove(self.path)  # it holds the old output now
            return
        prefix = f".{os.path.basename(self.target)}{TMP_TAG}"
        suffix = os.path.basename(self.path)[len(prefix) :]
        old = os.path.join(os.path.dirname(self.target), f".{os.path.basename(self.target)}{OLD_TAG}{suffix}")
        os.replace(self.target, old)
        try:
            os.replace(self.path, self.target)
        except BaseException:
            os.replace(old, self.target)  # put the old output back
            raise
        self._remove(old)

    def _remove(self, path: str) -> None:
        _ACTIVE.discard(self.path)
        shutil.rmtree(path, ignore_errors=True)
        if os.path.lexists(path):
            logger.warning("could not remove %s (the replaced output); the next run will", path)

    def discard(self) -> None:
        """Delete the temporary directory; ``target`` is left as it was."""
        _ACTIVE.discard(self.path)
        shutil.rmtree(self.path, ignore_errors=True)
