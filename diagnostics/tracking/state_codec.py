"""JSON encoding of diagnostics' cross-step state, saved in the run's metadata so a resumed run continues.

Tensors and arrays are stored as base64 of their bytes with dtype and shape, so they come back bit-exact
(a resumed run keeps the signs of previous eigenvectors, EMAs and alarm counters); non-finite floats are
spelled out because JSON has no NaN or infinity.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch

from diagnostics.metrics.base import Diagnostic

__all__ = ["decode_state", "diagnostics_state", "encode_state", "load_diagnostics_state"]


def encode_state(value: Any) -> Any:
    """Make a diagnostic's state JSON-serialisable; tensors and arrays keep dtype, shape and exact bytes.

    Cost: one CPU copy and base64 pass over every tensor in ``value``.
    """
    if torch.is_tensor(value):
        t = value.detach().cpu().contiguous()
        return {
            "__tensor__": base64.b64encode(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"").decode(),
            "dtype": str(t.dtype).removeprefix("torch."),
            "shape": list(t.shape),
        }
    if isinstance(value, np.ndarray):
        return {"__ndarray__": base64.b64encode(value.tobytes()).decode(), "dtype": str(value.dtype), "shape": list(value.shape)}
    if isinstance(value, Mapping):
        return {str(k): encode_state(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [encode_state(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return {"__float__": repr(value)}
    return value


def decode_state(value: Any) -> Any:
    """Inverse of :func:`encode_state` (tensors come back on the CPU; tuples come back as lists)."""
    if isinstance(value, dict):
        if "__tensor__" in value:
            dtype = getattr(torch, value["dtype"])
            raw = bytearray(base64.b64decode(value["__tensor__"]))
            if not raw:
                return torch.empty(value["shape"], dtype=dtype)
            return torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape(value["shape"]).clone()
        if "__ndarray__" in value:
            return np.frombuffer(base64.b64decode(value["__ndarray__"]), dtype=value["dtype"]).reshape(value["shape"]).copy()
        if "__float__" in value:
            return float(value["__float__"])
        return {k: decode_state(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode_state(v) for v in value]
    return value


def diagnostics_state(diagnostics: Iterable[Diagnostic]) -> dict[str, Any]:
    """``{name: encoded d.state_dict()}`` for every diagnostic. Cost: one encoding pass over the states."""
    return {d.name: encode_state(d.state_dict()) for d in diagnostics}


def load_diagnostics_state(diagnostics: Iterable[Diagnostic], saved: Mapping[str, Any]) -> None:
    """Hand each diagnostic its decoded saved entry (whole: ``load_state_dict`` also reads the layout of
    runs saved before state lived on the diagnostic, ``{"attrs": ..., "ctx": ...}``)."""
    for d in diagnostics:
        entry = saved.get(d.name)
        if entry:
            d.load_state_dict(decode_state(entry))
