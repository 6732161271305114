"""Resumable statistics: atomic, checksummed checkpoints of the accumulated sums.

``initialize(..., stats_checkpoint=PATH, checkpoint_every=K)`` saves the
statistics every K processed batches and at the end of the pass. A rerun with
the same arguments loads the file, skips the batches it already holds (the
loader must yield the same batches in the same order) and goes on from there;
a finished pass is not run again.

File format: ``torch.save`` of ``{"format", "fingerprint", "sha256", "payload"}``
where ``payload`` is the serialized statistics and ``sha256`` its digest. It is
written to a temporary file in the same directory, flushed, fsync'ed and renamed
over PATH, so PATH always holds the last complete checkpoint, also after a kill.
The fingerprint records what the sums depend on (target modules and shapes,
model parameters' names/shapes/dtypes and a small content digest, token mask,
loss function, statistics backend); a checkpoint with another fingerprint is
refused with the differences named.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from typing import Any, Dict, Optional

import torch
from torch import nn

from .layers import linear_dims

FORMAT = "lora-da-statistics/1"


def _callable_name(function: Any) -> Optional[str]:
    if function is None:
        return None
    return f"{getattr(function, '__module__', '?')}.{getattr(function, '__qualname__', type(function).__name__)}"


def statistics_fingerprint(
    model: nn.Module, modules: Dict[str, nn.Module], token_mask: Any, loss_fn: Any, backend_name: str
) -> dict:
    """What the accumulated sums depend on (see the module doc)."""
    digest = hashlib.sha256()
    for name, parameter in model.named_parameters():
        digest.update(f"{name}:{tuple(parameter.shape)}:{parameter.dtype}".encode())
        if parameter.is_floating_point() and parameter.numel() > 0:
            head = parameter.detach().reshape(-1)[:64].to("cpu", torch.float64)
            digest.update(head.numpy().tobytes())
    return {
        "modules": [(name, *linear_dims(module)) for name, module in modules.items()],
        "model": digest.hexdigest(),
        "token_mask": token_mask if isinstance(token_mask, (str, type(None))) else _callable_name(token_mask),
        "loss_fn": _callable_name(loss_fn),
        "stats_backend": backend_name,
    }


class StatisticsCheckpoint:
    """Where and how often the statistics pass saves its sums."""

    def __init__(self, path: str, every: int, fingerprint: dict):
        if every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {every}")
        self.path = os.fspath(path)
        self.every = every
        self.fingerprint = fingerprint

    def load(self, device: torch.device) -> Optional[dict]:
        """The saved state, or ``None`` when there is no file yet."""
        if not os.path.exists(self.path):
            return None
        try:
            record = torch.load(self.path, map_location="cpu", weights_only=False)
        except Exception as error:
            raise ValueError(f"statistics checkpoint '{self.path}' cannot be read: {error}") from error
        if not isinstance(record, dict) or record.get("format") != FORMAT:
            raise ValueError(f"'{self.path}' is not a lora-da statistics checkpoint ({FORMAT})")
        if hashlib.sha256(record["payload"]).hexdigest() != record["sha256"]:
            raise ValueError(f"statistics checkpoint '{self.path}' is corrupt (checksum mismatch)")
        saved = record["fingerprint"]
        if saved != self.fingerprint:
            differing = sorted(k for k in set(saved) | set(self.fingerprint) if saved.get(k) != self.fingerprint.get(k))
            raise ValueError(
                f"statistics checkpoint '{self.path}' belongs to another configuration "
                f"(differs in: {', '.join(differing)}); delete it or pass another stats_checkpoint path"
            )
        return torch.load(io.BytesIO(record["payload"]), map_location=device, weights_only=False)

    def save(self, state: dict) -> None:
        """Write ``state`` atomically (temporary file, fsync, rename)."""
        buffer = io.BytesIO()
        torch.save(state, buffer)
        payload = buffer.getvalue()
        record = {
            "format": FORMAT,
            "fingerprint": self.fingerprint,
            "sha256": hashlib.sha256(payload).hexdigest(),
            "payload": payload,
        }
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=".lora-da-stats-", dir=directory)
        try:
            with os.fdopen(handle, "wb") as f:
                torch.save(record, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            if os.path.exists(temporary):
                os.remove(temporary)
            raise
