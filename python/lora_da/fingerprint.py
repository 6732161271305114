"""What the statistics depend on: the fingerprint a checkpoint must match.

The target modules and their dims, the model's parameters (names, shapes,
dtypes and a digest of the whole of every parameter), the token mask, the loss
function and the statistics backend. A checkpoint with another fingerprint is
refused (:mod:`lora_da.checkpoint`).
"""

from __future__ import annotations

import hashlib
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from .layers import linear_dims

# fingerprint: per parameter, up to _SAMPLE evenly spaced elements (their bits) and exact
# integer sums of the bits of the whole tensor, chunk by chunk (no float rounding, so the
# same on every device and thread count), transferred to the host in blocks.
_SAMPLE = 4096
_CHUNK = 1 << 22
_BLOCK = 1 << 20
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _callable_name(function: Any) -> Optional[str]:
    if function is None:
        return None
    return f"{getattr(function, '__module__', '?')}.{getattr(function, '__qualname__', type(function).__name__)}"


def _content_probe(parameter: torch.Tensor) -> Optional[torch.Tensor]:
    """A 1-D int64 tensor (on the parameter's device) that changes with any element of it:
    the bits of up to ``_SAMPLE`` evenly spaced elements, then per chunk of the tensor the
    exact integer sum of its bits (read as int8/16/32 words; no float rounding, so the same
    on every device and thread count). ``None`` when the content cannot be read (meta
    tensors, tensor subclasses without a plain bit layout)."""
    if parameter.device.type == "meta" or parameter.numel() == 0:
        return None
    try:
        flat = parameter.detach()
        if flat.is_complex():
            flat = torch.view_as_real(flat)
        flat = flat.reshape(-1)
        if flat.stride(0) != 1:
            flat = flat.contiguous()
        bits = flat.view(_BITS[flat.element_size()])
        n = bits.numel()
        if n > _SAMPLE:
            index = torch.arange(_SAMPLE, dtype=torch.int64, device=bits.device) * (n - 1) // (_SAMPLE - 1)
            sample = bits[index]
        else:
            sample = bits
        words = bits.view(torch.int32) if bits.element_size() == 8 else bits  # |word| < 2**31
        sums = [words[start : start + _CHUNK].sum(dtype=torch.int64) for start in range(0, words.numel(), _CHUNK)]
        return torch.cat([sample.to(torch.int64), torch.stack(sums)])
    except (KeyError, RuntimeError, TypeError, NotImplementedError):
        return None


def _model_digest(model: nn.Module) -> str:
    """SHA-256 over every parameter's name, shape, dtype and :func:`_content_probe`."""
    digest = hashlib.sha256()
    pending: List[Tuple[str, Optional[torch.Tensor]]] = []

    def flush() -> None:
        probes = [probe for _, probe in pending if probe is not None]
        host = torch.cat(probes).cpu().split([p.numel() for p in probes]) if probes else []
        values = iter(host)
        for text, probe in pending:
            digest.update(text.encode())
            digest.update(next(values).numpy().tobytes() if probe is not None else b"<content not read>")
        pending.clear()

    held, device = 0, None
    for name, parameter in model.named_parameters():
        probe = _content_probe(parameter)
        if probe is not None and device is not None and probe.device != device:
            flush()
            held = 0
        if probe is not None:
            device = probe.device
        pending.append((f"\0{name}:{tuple(parameter.shape)}:{parameter.dtype}\0", probe))
        held += 0 if probe is None else probe.numel()
        if held >= _BLOCK:
            flush()
            held = 0
    flush()
    return digest.hexdigest()


def statistics_fingerprint(
    model: nn.Module,
    modules: Dict[str, nn.Module],
    token_mask: Any,
    loss_fn: Any,
    backend_name: str,
    accumulators: str = "",
) -> dict:
    """What the accumulated sums depend on (see the module doc), as JSON-ready values
    (``accumulators``: the accumulators' dtypes, e.g. ``"Z float64, G/y float32"``, so that a
    checkpoint of another ``statistics_precision`` is refused, not continued in its dtypes).

    The model part hashes every parameter's name, shape and dtype, the bits of up to
    4096 evenly spaced elements of it and exact integer sums of the bits of all its
    elements (per 4Mi-word chunk), computed on the parameter's device; about 32 KiB per
    parameter is copied to the host. A change to any one element shows; several changes
    go unseen only if they miss every sampled element and their bit sums cancel within a
    chunk. Buffers are not hashed. The result does not depend on the device or thread count.
    """
    return {
        "modules": [[name, *linear_dims(module)] for name, module in modules.items()],
        "model": _model_digest(model),
        "token_mask": token_mask if isinstance(token_mask, (str, type(None))) else _callable_name(token_mask),
        "loss_fn": _callable_name(loss_fn),
        "stats_backend": backend_name,
        "accumulators": accumulators,
    }
