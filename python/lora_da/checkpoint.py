"""Resumable statistics: atomic, checksummed checkpoints of the accumulated sums.

``initialize(..., stats_checkpoint=PATH, checkpoint_every=K)`` saves the statistics every K
processed batches and at the end of the pass. A rerun with the same arguments loads the file, skips
the batches it already holds (the loader must yield the same batches in the same order) and goes on
from there; a finished pass is not run again.

File format (``lora-da-statistics/3``): a safetensors file. Its tensors are the sums, ``Z.<g>``
(``Σ m a aᵀ`` of input group ``g``) and, after a full pass, ``G.<j>`` / ``y.<j>`` (gradient sum and
output-factor diagonal of the ``j``-th module); its metadata holds one entry, ``lora_da``: a
canonical JSON header ``{"format", "fingerprint", "counts", "forward_only", "groups", "modules",
"sha256"}``; each group is ``{"members", "num_tokens"}`` and each module ``{"name", "group",
"num_tokens"}`` (its own token count, docs/math.md §2). ``sha256`` is the SHA-256 of the canonical
JSON of the header without ``sha256``, a NUL byte, then the bytes of every tensor in header order:
it covers everything in the file but itself.

The fingerprint records what the sums depend on (target modules and their dims, the model's
parameters — names, shapes, dtypes and a content digest over the whole of every parameter —, token
mask, loss function, statistics backend); a checkpoint with another fingerprint is refused with the
differences named.

What protects what. The digest is not a signature (anyone can recompute it); it catches corruption,
truncation (with safetensors' own offset checks) and a field edited without recomputing it; a file
of another configuration is caught by the fingerprint, one of another format by the format field.
The defence against a hostile file is that loading runs no code (no pickle: safetensors and JSON
only; torch.save files are refused unread) and that every field is validated before use: the format;
the fingerprint against this run's; counts are non-negative ints with ``skipped_batches <=
num_batches``, and groups/modules are present exactly when a batch was processed; every group's and
module's ``num_tokens`` is a non-negative int; every target module appears once, in one input group
whose members share its input dim; tensors are exactly the expected ones, float32/float64, shaped by
the fingerprint's dims, a module's ``G`` and ``y`` of one dtype, and finite. Everything is loaded on
the CPU and then moved to the model's device. Refusals are one-line ``ValueError`` naming the file
and what is wrong.

Writing: a temporary ``.lora-da-stats-<name>.<8 hex>.tmp`` in the same directory (created with mode
``0666 & ~umask``, like any file the user creates), fsync'ed and renamed over PATH, so PATH always
holds the last complete checkpoint, also after a kill. Temporaries of this exact pattern left by a
killed run, owned by this user and not modified for an hour, are removed when the next run opens the
checkpoint; nothing else is touched.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import stat
import struct
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

import torch


FORMAT = "lora-da-statistics/3"
_METADATA_KEY = "lora_da"
_HEADER_KEYS = {"format", "fingerprint", "counts", "forward_only", "groups", "modules", "sha256"}
_COUNTS = ("num_samples", "num_tokens", "num_batches", "skipped_batches", "skipped_samples")
_DTYPES = {"F32": torch.float32, "F64": torch.float64}
_TEMP_PREFIX = ".lora-da-stats-"
_STALE_SECONDS = 3600.0

def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def _digest(header: dict, tensors: List[torch.Tensor]) -> str:
    body = {key: value for key, value in header.items() if key != "sha256"}
    digest = hashlib.sha256(_canonical(body).encode())
    digest.update(b"\0")
    for tensor in tensors:
        digest.update(_tensor_bytes(tensor))
    return digest.hexdigest()


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    array = tensor.detach().contiguous().cpu().numpy()
    if sys.byteorder != "little":
        array = array.astype(array.dtype.newbyteorder("<"))
    return memoryview(array).cast("B")


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float64: "F64"}


def _write_safetensors(f: Any, keys: List[str], tensors: List[torch.Tensor], header: dict) -> None:
    """A safetensors file (8-byte little-endian header length, JSON header padded to 8 bytes,
    the tensors' bytes in order) whose metadata is ``header`` with its ``sha256`` set, streamed
    one tensor at a time: each tensor is read once (copied to the host once when it is on a
    device, not at all when it is a contiguous little-endian CPU tensor) and hashed as it is
    written; the digest is filled into the header afterwards (a 64-hex-digit placeholder of
    the same length is written first). Written here rather than with
    ``safetensors.torch.save_file``, which may write its own temporary file (mode 0600) and
    needs every tensor on the host at once."""
    entries: Dict[str, Any] = {}
    offset = 0
    for key, tensor in zip(keys, tensors):
        if tensor.dtype not in _SAFETENSORS_DTYPES:
            raise TypeError(f"statistics tensor '{key}' is {tensor.dtype}; checkpoints hold float32/float64 sums")
        size = tensor.numel() * tensor.element_size()
        entries[key] = {
            "dtype": _SAFETENSORS_DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size

    def encoded(sha256: str) -> bytes:
        metadata = {_METADATA_KEY: _canonical({**header, "sha256": sha256})}
        text = json.dumps({"__metadata__": metadata, **entries}, separators=(",", ":"), ensure_ascii=True).encode()
        return text + b" " * (-len(text) % 8)

    placeholder = encoded("0" * 64)
    start = f.tell()
    f.write(struct.pack("<Q", len(placeholder)))
    f.write(placeholder)
    digest = hashlib.sha256(_canonical({k: v for k, v in header.items() if k != "sha256"}).encode())
    digest.update(b"\0")
    for tensor in tensors:
        data = _tensor_bytes(tensor)
        digest.update(data)
        f.write(data)
        del data
    final = encoded(digest.hexdigest())
    if len(final) != len(placeholder):  # pragma: no cover - hex digits never need escaping
        raise AssertionError("the checkpoint header changed length")
    end = f.tell()
    f.seek(start + 8)
    f.write(final)
    f.seek(end)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON here")


class _Refused(ValueError):
    """A checkpoint file that is not loaded; the message names the file and the fault."""


class StatisticsCheckpoint:
    """Where and how often the statistics pass saves its sums."""

    def __init__(self, path: str, every: int, fingerprint: dict):
        if every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {every}")
        self.path = os.fspath(path)
        self.every = every
        self.fingerprint = json.loads(_canonical(fingerprint))  # tuples -> lists, as read back

    # -- reading ----------------------------------------------------------------------
    def _refuse(self, what: str) -> _Refused:
        return _Refused(f"statistics checkpoint '{self.path}' {what}")

    def load(self, device: torch.device) -> Optional[dict]:
        """The saved state (see :meth:`lora_da.collector.Collector.state`), on ``device``,
        or ``None`` when there is no file yet. Runs no code from the file; every field is
        validated (see the module doc) and a bad file raises a one-line ``ValueError``."""
        try:
            return self._load(device)
        except _Refused as refusal:
            raise ValueError(str(refusal)) from refusal.__cause__

    def _load(self, device: torch.device) -> Optional[dict]:
        self._remove_stale_temporaries()
        if not os.path.exists(self.path):
            return None
        from safetensors import safe_open

        try:
            with safe_open(self.path, framework="pt", device="cpu") as f:
                header = self._read_header(f.metadata())
                layout = self._layout(header, f)
                tensors = [f.get_tensor(key) for key, _, _ in layout]
        except _Refused:
            raise
        except Exception as error:  # safetensors' own checks: header, offsets, truncation
            raise self._unreadable(error) from error
        if _digest(header, tensors) != header["sha256"]:
            raise self._refuse("is corrupt (checksum mismatch: a field or tensor was changed or damaged)")
        for (key, _, _), tensor in zip(layout, tensors):
            if not bool(torch.isfinite(tensor).all()):
                raise self._refuse(f"holds NaN/Inf in tensor '{key}'")
        return self._state(header, [t.to(device) for t in tensors])

    def _unreadable(self, error: Exception) -> _Refused:
        try:
            with open(self.path, "rb") as f:
                start = f.read(4)
        except OSError:
            start = b""
        if start.startswith(b"PK\x03\x04") or start[:1] == b"\x80":  # torch.save zip / raw pickle
            return self._refuse(
                f"is a torch.save/pickle file, not a {FORMAT} checkpoint (safetensors); pickles are never "
                "loaded (they can run code), also not those of older lora-da versions: delete it or pass "
                "another stats_checkpoint path"
            )
        message = " ".join(str(error).split()) or type(error).__name__
        return self._refuse(f"cannot be read as a {FORMAT} checkpoint (safetensors): {message}")

    def _read_header(self, metadata: Optional[Dict[str, str]]) -> dict:
        if not isinstance(metadata, dict) or _METADATA_KEY not in metadata:
            raise self._refuse(f"is a safetensors file without a lora-da header: not a {FORMAT} checkpoint")
        text = metadata[_METADATA_KEY]
        try:
            header = json.loads(text, parse_constant=_refuse_constant)
        except ValueError as error:
            raise self._refuse(f"has an unreadable header ({error})") from error
        if not isinstance(header, dict):
            raise self._refuse(f"has a header of type {type(header).__name__}, expected an object")
        found = header.get("format")
        if found != FORMAT:
            raise self._refuse(f"has format {found!r}; this lora-da reads {FORMAT!r} only: delete it")
        if set(header) != _HEADER_KEYS:
            raise self._refuse(f"has header fields {sorted(header)}, expected {sorted(_HEADER_KEYS)}")
        if _canonical(header) != text:
            raise self._refuse("has a header that is not in canonical JSON form (edited by hand?)")
        if not (isinstance(header["sha256"], str) and re.fullmatch(r"[0-9a-f]{64}", header["sha256"])):
            raise self._refuse("has a malformed sha256 field")
        saved = header["fingerprint"]
        if not isinstance(saved, dict):
            raise self._refuse(f"has a fingerprint of type {type(saved).__name__}, expected an object")
        if saved != self.fingerprint:
            differing = sorted(k for k in set(saved) | set(self.fingerprint) if saved.get(k) != self.fingerprint.get(k))
            raise self._refuse(
                f"belongs to another configuration (differs in: {', '.join(differing)}); "
                "delete it or pass another stats_checkpoint path"
            )
        self._check_counts(header)
        return header

    def _check_counts(self, header: dict) -> None:
        if not isinstance(header["groups"], list) or not isinstance(header["modules"], list):
            raise self._refuse("has groups/modules that are not lists")
        if not isinstance(header["forward_only"], bool):
            raise self._refuse(f"has forward_only={header['forward_only']!r}, expected true or false")
        counts = header["counts"]
        if not isinstance(counts, dict) or set(counts) != set(_COUNTS):
            raise self._refuse(f"has counts {counts!r}, expected an object with {list(_COUNTS)}")
        for key in _COUNTS:
            if not _is_count(counts[key]):
                raise self._refuse(f"has counts.{key}={counts[key]!r}, expected a non-negative int")
        if counts["skipped_batches"] > counts["num_batches"]:
            raise self._refuse(
                f"has counts.skipped_batches={counts['skipped_batches']} > num_batches={counts['num_batches']}"
            )
        processed = counts["num_batches"] - counts["skipped_batches"]
        if processed == 0 and any(counts[k] for k in ("num_samples", "num_tokens", "skipped_samples")):
            raise self._refuse("counts tokens or samples but no processed batch")
        for field in ("groups", "modules"):
            if (processed == 0) != (not header[field]):
                raise self._refuse(
                    f"has {processed} processed batches and {len(header[field])} {field}: "
                    "groups and modules are recorded exactly when a batch was processed"
                )

    def _layout(self, header: dict, f: Any) -> List[Tuple[str, List[int], torch.dtype]]:
        """``(key, shape, dtype)`` of every tensor the header implies, in digest order; checks
        groups and modules against the fingerprint and the file's tensors against the layout."""
        dims = {name: (d_in, d_out) for name, d_in, d_out in self.fingerprint["modules"]}
        groups, modules = header["groups"], header["modules"]
        if modules:
            member_of: Dict[str, int] = {}
            for index, group in enumerate(groups):
                ok = isinstance(group, dict) and set(group) == {"members", "num_tokens"}
                members = group.get("members") if ok else None
                if not isinstance(members, list) or not members or not all(isinstance(m, str) for m in members):
                    raise self._refuse(
                        f"has input group {index} = {group!r}, expected {{'members': [names], 'num_tokens': int}}"
                    )
                if not _is_count(group["num_tokens"]):
                    raise self._refuse(
                        f"has input group {index} with num_tokens={group['num_tokens']!r}, expected a non-negative int"
                    )
                for name in members:
                    if name not in dims:
                        raise self._refuse(f"has input group {index} with module '{name}', not a target module")
                    if name in member_of:
                        raise self._refuse(f"has module '{name}' in input groups {member_of[name]} and {index}")
                    member_of[name] = index
                if len({dims[name][0] for name in members}) != 1:
                    raise self._refuse(f"has input group {index} whose members {members} differ in input dim")
            names = []
            for j, module in enumerate(modules):
                ok = isinstance(module, dict) and set(module) == {"name", "group", "num_tokens"}
                if not ok or not isinstance(module["name"], str) or not _is_count(module["group"]):
                    raise self._refuse(
                        f"has module entry {j} = {module!r}, expected {{'name': str, 'group': int, 'num_tokens': int}}"
                    )
                if not _is_count(module["num_tokens"]):
                    raise self._refuse(
                        f"has module '{module['name']}' with num_tokens={module['num_tokens']!r}, expected a non-negative int"
                    )
                if member_of.get(module["name"]) != module["group"]:
                    raise self._refuse(
                        f"has module '{module['name']}' with group {module['group']}, "
                        f"but input groups list it in {member_of.get(module['name'])}"
                    )
                names.append(module["name"])
            if len(set(names)) != len(names) or set(names) != set(dims) or set(member_of) != set(dims):
                missing = sorted(set(dims) - set(names))
                raise self._refuse(f"does not list every target module exactly once (missing: {missing})")
        keys = set(f.keys())
        dtypes = []
        layout = []
        for index, group in enumerate(groups):
            d_in = dims[group["members"][0]][0]
            key = f"Z.{index}"
            dtype = self._tensor_dtype(f, keys, key, [d_in, d_in])
            dtypes.append(dtype)
            layout.append((key, [d_in, d_in], dtype))
        if not header["forward_only"]:
            for j, module in enumerate(modules):
                d_in, d_out = dims[module["name"]]
                # G and y share one dtype; Z may be wider (float64 Z with float32 G and y: docs/math.md §5.6)
                dtype = self._tensor_dtype(f, keys, f"y.{j}", [d_out])
                for key, shape in ((f"G.{j}", [d_out, d_in]), (f"y.{j}", [d_out])):
                    if self._tensor_dtype(f, keys, key, shape) != dtype:
                        raise self._refuse(f"has tensor '{key}' of another dtype than its module's y ({dtype})")
                    layout.append((key, shape, dtype))
        unexpected = keys - {key for key, _, _ in layout}
        if unexpected:
            raise self._refuse(f"has unexpected tensors {sorted(unexpected)[:5]}")
        return layout

    def _tensor_dtype(self, f: Any, keys: set, key: str, shape: List[int]) -> torch.dtype:
        if key not in keys:
            raise self._refuse(f"lacks tensor '{key}'")
        tensor = f.get_slice(key)
        found_shape, found_dtype = list(tensor.get_shape()), tensor.get_dtype()
        if found_shape != shape:
            raise self._refuse(f"has tensor '{key}' of shape {found_shape}, expected {shape} (from the target modules)")
        if found_dtype not in _DTYPES:
            raise self._refuse(f"has tensor '{key}' of dtype {found_dtype}, expected F32 or F64")
        return _DTYPES[found_dtype]

    @staticmethod
    def _state(header: dict, tensors: List[torch.Tensor]) -> dict:
        groups, modules = header["groups"], header["modules"]
        z, rest = tensors[: len(groups)], tensors[len(groups) :]
        full = not header["forward_only"]
        return {
            "groups": [(tuple(group["members"]), z[i], group["num_tokens"]) for i, group in enumerate(groups)],
            "modules": [
                (m["name"], m["group"], rest[2 * j] if full else None, rest[2 * j + 1] if full else None, m["num_tokens"])
                for j, m in enumerate(modules)
            ],
            "counts": tuple(header["counts"][key] for key in _COUNTS),
            "forward_only": header["forward_only"],
        }

    # -- writing ----------------------------------------------------------------------
    def _temporary_tag(self) -> str:
        base = os.path.basename(self.path)
        return base if len(base.encode()) <= 128 else hashlib.sha256(base.encode()).hexdigest()[:32]

    def save(self, state: dict) -> None:
        """Write ``state`` (:meth:`lora_da.collector.Collector.state`) atomically: a temporary
        file in the same directory with the user's umask mode, fsync, rename over the path.
        Tensors are streamed one at a time, each read once (hashed as it is written):
        the payload is never copied as a whole."""
        forward_only = bool(state["forward_only"])
        groups = [{"members": list(members), "num_tokens": int(tokens)} for members, _, tokens in state["groups"]]
        modules = [
            {"name": name, "group": int(index), "num_tokens": int(tokens)} for name, index, _, _, tokens in state["modules"]
        ]
        tensors = [z for _, z, _ in state["groups"]]
        if not forward_only:
            for _, _, g, y, _ in state["modules"]:
                tensors += [g, y]
        header = {
            "format": FORMAT,
            "fingerprint": self.fingerprint,
            "counts": dict(zip(_COUNTS, (int(c) for c in state["counts"]))),
            "forward_only": forward_only,
            "groups": groups,
            "modules": modules,
        }
        keys = [f"Z.{i}" for i in range(len(groups))]
        if not forward_only:
            keys += [f"{kind}.{j}" for j in range(len(modules)) for kind in ("G", "y")]

        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        while True:
            temporary = os.path.join(directory, f"{_TEMP_PREFIX}{self._temporary_tag()}.{secrets.token_hex(4)}.tmp")
            try:  # a new file of our own; the kernel applies the umask to 0o666, as for any user file
                handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
                break
            except FileExistsError:
                continue
        try:
            with os.fdopen(handle, "wb") as f:
                _write_safetensors(f, keys, tensors, header)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            if os.path.exists(temporary):
                os.remove(temporary)
            raise
        try:  # make the rename itself durable
            directory_handle = os.open(directory, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(directory_handle)
        except OSError:
            pass
        finally:
            os.close(directory_handle)

    def _remove_stale_temporaries(self) -> None:
        """Remove temporaries of this checkpoint path left by a killed run: only names of
        our exact pattern in its directory, regular files owned by this user, not modified
        in the last hour, empty or starting like a safetensors file."""
        directory = os.path.dirname(os.path.abspath(self.path))
        pattern = re.compile(re.escape(_TEMP_PREFIX + self._temporary_tag()) + r"\.[0-9a-f]{8}\.tmp")
        try:
            names = [n for n in os.listdir(directory) if pattern.fullmatch(n)]
        except OSError:
            return
        now = time.time()
        for name in names:
            candidate = os.path.join(directory, name)
            try:
                info = os.lstat(candidate)
                if not stat.S_ISREG(info.st_mode):
                    continue
                if hasattr(os, "getuid") and info.st_uid != os.getuid():
                    continue
                if now - info.st_mtime < _STALE_SECONDS:
                    continue
                if info.st_size > 0:
                    with open(candidate, "rb") as f:
                        start = f.read(9)
                    if len(start) < 9 or start[8:9] != b"{":
                        continue
                os.remove(candidate)
            except OSError:
                continue
