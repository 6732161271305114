"""The ``--out`` directory: refused when it holds something else, written atomically."""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Union

from ..report import JSON_NAME
from .errors import UsageError

REPLACE_OWN_OUTPUT = "own-output"


def check_out(out: str, overwrite: Union[bool, str]) -> None:
    """Refuse an existing non-empty ``--out`` (before doing any work) unless
    ``overwrite`` (``REPLACE_OWN_OUTPUT``: only an earlier lora-da output)."""
    if os.path.isfile(out):
        raise UsageError(f"--out {out} is a file")
    if not (os.path.isdir(out) and os.listdir(out)):
        return
    if overwrite == REPLACE_OWN_OUTPUT:
        if not os.path.exists(os.path.join(out, JSON_NAME)):
            raise UsageError(f"--out {out} exists and is not an earlier lora-da output; choose another --out")
    elif not overwrite:
        raise UsageError(f"--out {out} exists and is not empty; pass --overwrite to replace it")


class AtomicDirectory:
    """Write into a temporary sibling of ``target``; :meth:`commit` renames it into place."""

    def __init__(self, target: str):
        self.target = os.path.abspath(target)
        parent = os.path.dirname(self.target)
        os.makedirs(parent, exist_ok=True)
        self.path = tempfile.mkdtemp(prefix=f".{os.path.basename(self.target)}.tmp-", dir=parent)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.path, 0o777 & ~umask)  # mkdtemp makes it 0700

    def commit(self) -> None:
        """Move the written directory to ``target``, replacing what was there."""
        old = None
        if os.path.exists(self.target):
            old = self.path + "-old"
            os.replace(self.target, old)
        os.replace(self.path, self.target)
        if old:
            shutil.rmtree(old, ignore_errors=True)

    def discard(self) -> None:
        """Delete the temporary directory; ``target`` is left as it was."""
        shutil.rmtree(self.path, ignore_errors=True)
