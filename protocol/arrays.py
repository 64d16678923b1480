"""Pack / unpack the Episode arrays (numpy <-> little-endian bytes of the declared dtype)."""
from __future__ import annotations

from typing import Iterable

import numpy as np

from .messages import DTYPES


def pack(field: str, values: Iterable | np.ndarray) -> bytes:
    return np.ascontiguousarray(values, dtype=DTYPES[field]).tobytes()


def unpack(field: str, buf: bytes | memoryview) -> np.ndarray:
    """A read-only view (no copy) of a packed field."""
    return np.frombuffer(buf, dtype=DTYPES[field])


def state_digest(named_buffers: Iterable[tuple[str, bytes | memoryview | np.ndarray]]) -> str:
    """sha256 over (name, raw bytes) sorted by name: actor and learner compare held weights with it."""
    import hashlib

    h = hashlib.sha256()
    for name, buf in sorted(named_buffers, key=lambda kv: kv[0]):
        h.update(name.encode())
        h.update(memoryview(buf).cast("B") if not isinstance(buf, np.ndarray) else buf.tobytes())
    return h.hexdigest()
