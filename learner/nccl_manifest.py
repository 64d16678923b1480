"""What one NCCL weight broadcast carries (names, dtypes, shapes, in order) and its digests.

Pure bookkeeping shared by the learner's broadcaster (``nccl_sync.py``) and the handshake: the
engine allocates exactly the manifest's tensors and receives them in its order.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch

from himac.protocol import NcclOffer


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --------------------------------------------------------------------------- manifest
@dataclass(frozen=True)
class Manifest:
    """What one broadcast carries, in order: the engine allocates exactly these tensors."""

    names: tuple[str, ...]
    dtypes: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype | str | None = None,
           skip: Iterable[str] = ()) -> "Manifest":
        """Every tensor once: a name sharing storage with an earlier one (tied weights) is skipped,
        as ``publisher.serialize`` does, and so are the names in ``skip`` (tied aliases whose sharing a
        clone broke, e.g. ``lm_head.weight`` when config.json ties it; SGLang ignores it anyway);
        floating tensors are cast to ``dtype`` (None: as they are)."""
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        skip = set(skip)
        seen: set[tuple[int, int]] = set()
        names, dtypes, shapes = [], [], []
        for name, t in state_dict.items():
            key = (t.untyped_storage().data_ptr(), t.storage_offset())
            if key in seen or name in skip:
                continue
            seen.add(key)
            names.append(name)
            dtypes.append(dtype_name(dtype if dtype is not None and t.is_floating_point() else t.dtype))
            shapes.append(tuple(int(s) for s in t.shape))
        return cls(tuple(names), tuple(dtypes), tuple(shapes))

    @property
    def nbytes(self) -> int:
        total = 0
        for dt, shape in zip(self.dtypes, self.shapes):
            n = 1
            for s in shape:
                n *= s
            total += n * getattr(torch, dt).itemsize
        return total

    @property
    def sha256(self) -> str:
        h = hashlib.sha256()
        for n, d, s in zip(self.names, self.dtypes, self.shapes):
            h.update(f"{n}|{d}|{','.join(map(str, s))}\n".encode())
        return h.hexdigest()

    def engine_args(self) -> dict[str, Any]:
        """Keyword arguments of ``Engine.update_weights_from_distributed`` (less group_name)."""
        return {"names": list(self.names), "dtypes": list(self.dtypes), "shapes": [list(s) for s in self.shapes]}


# --------------------------------------------------------------------------- handshake messages
# NcclOffer / NcclPull / NcclPush are part of the wire contract (protocol/messages.py).
def offer_engine_args(offer: NcclOffer) -> dict[str, Any]:
    """Keyword arguments of ``SGLangBackend.init_weights_group`` for an offer."""
    return {"master_address": offer.master_address, "master_port": offer.master_port,
            "world_size": offer.world_size, "group_name": offer.group_name, "rank_offset": offer.rank_offset,
            "backend": offer.backend, "timeout_s": offer.timeout_s}


def content_digest(state_dict: Mapping[str, torch.Tensor]) -> str:
    """The learner's weights digest (every name, tied included): what the actor reports after a load."""
    from himac.protocol.arrays import state_digest

    return state_digest((k, v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
                        for k, v in state_dict.items())
