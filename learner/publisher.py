"""Weight transports: how a new policy version reaches the actors.

- ``disk``: safetensors in ``RUN/weights/v000042/model.safetensors`` beside the model's
  config.json (so SGLang's ``update_weights_from_disk`` can load the folder), written to a temp
  folder and renamed: a reader never sees a half-written version.
- ``zmq``: the same bytes kept in memory and served in chunks by a ROUTER socket, for actors in
  containers that share no volume with the learner.
(NCCL broadcast for SGLang on GPUs lives with the SGLang backend: ``learner/nccl_sync.py``.)
Every announcement carries the payload's size and sha256, which the actor verifies.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
from collections import OrderedDict
from pathlib import Path

import torch
import zmq

from himac.protocol import FetchWeights, Rejected, WeightsAnnouncement, WeightsChunk, decode, encode

log = logging.getLogger(__name__)


_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64",
              torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}


def serialize(state_dict: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> bytearray:
    """The safetensors payload of a state dict, written in one pass into one buffer.

    Each tensor is converted (``dtype`` for floating tensors) straight into its slot, so the
    buffer is itself a snapshot of the weights: no clone first, no per-tensor byte strings
    joined after (bench/weight_sync.py: ~0.5 s instead of ~10 s for a 0.5B model). A tensor
    sharing storage with an earlier one (tied embeddings) is written once.
    """
    seen: set[int] = set()
    tensors = []
    for name, t in state_dict.items():
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            continue
        seen.add(ptr)
        dt = dtype if dtype is not None and t.is_floating_point() else t.dtype
        tensors.append((name, t, dt, torch.empty(0, dtype=dt).element_size()))
    # widest elements first: every offset stays aligned to its element size, with no gaps (the format forbids them)
    tensors.sort(key=lambda x: -x[3])
    items, header, offset = [], {}, 0
    for name, t, dt, size in tensors:
        n = t.numel() * size
        header[name] = {"dtype": _ST_DTYPES[dt], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        items.append((t, dt, offset, n))
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # safetensors aligns the data to 8 bytes
    out = bytearray(8 + len(head) + offset)
    out[:8] = len(head).to_bytes(8, "little")
    out[8:8 + len(head)] = head
    flat = torch.frombuffer(out, dtype=torch.uint8)
    base = 8 + len(head)
    with torch.no_grad():
        for t, dt, a, n in items:
            if n:
                flat[base + a:base + a + n].view(dt).view(t.shape).copy_(t.detach())
    return out


class _BytesPublisher:
    def prepare(self, state_dict: dict[str, torch.Tensor]) -> bytearray:
        """The payload of this version, serialised now: it is the snapshot (training goes on meanwhile)."""
        return serialize(state_dict)


class DiskPublisher(_BytesPublisher):
    transport = "disk"

    def __init__(self, directory: str | os.PathLike, model_dir: str, keep: int = 3):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.model_dir = Path(model_dir)
        self.keep = keep

    def publish(self, payload: bytes | bytearray, version: int, phase: str, learner_id: str) -> WeightsAnnouncement:
        final = self.dir / f"v{version:06d}"
        tmp = self.dir / f".tmp-v{version:06d}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for name in ("config.json", "generation_config.json"):
            if (self.model_dir / name).exists():
                shutil.copy(self.model_dir / name, tmp / name)
        with open(tmp / "model.safetensors", "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        shutil.rmtree(final, ignore_errors=True)  # a resumed learner re-publishes its version
        os.replace(tmp, final)
        self._prune(version)
        return WeightsAnnouncement(version=version, phase=phase, learner_id=learner_id, transport="disk",
                                   location=str((final / "model.safetensors").resolve()), size=len(payload),
                                   sha256=hashlib.sha256(payload).hexdigest(), created_at=time.time())

    def _prune(self, newest: int) -> None:
        # keep a few versions up to this one (an actor may still be reading one); anything numbered
        # above it is from another timeline (an earlier run in this folder, or steps a resume redoes)
        versions = sorted(p for p in self.dir.glob("v*") if p.is_dir() and p.name[1:].isdigit())
        older = [p for p in versions if int(p.name[1:]) <= newest]
        for p in older[:-self.keep] + [p for p in versions if int(p.name[1:]) > newest]:
            shutil.rmtree(p, ignore_errors=True)

    def close(self) -> None:
        pass


class ZmqPublisher(_BytesPublisher):
    """Serves the latest payloads over a ROUTER: actors ask for byte ranges (FetchWeights)."""

    transport = "zmq"

    def __init__(self, bind_host: str, port: int, advertise_host: str, keep: int = 2, max_chunk: int = 64 << 20,
                 curve=None, on_reject=None):
        self._payloads: OrderedDict[int, bytes] = OrderedDict()
        self._lock = threading.Lock()
        self.keep, self.max_chunk = keep, max_chunk
        self.rejected = 0
        self._on_reject = on_reject or (lambda reason: None)  # count a bad request by reason (metrics)
        ctx = zmq.Context.instance()
        self._sock = ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        # requests are tiny: frames over 64 KiB are counted as oversized, over 128 KiB cut by ZMQ itself
        self._sock.setsockopt(zmq.MAXMSGSIZE, 1 << 17)
        if curve is not None:
            curve.server(self._sock)
        if port:
            self._sock.bind(f"tcp://{bind_host}:{port}")
            self.port = port
        else:
            self.port = self._sock.bind_to_random_port(f"tcp://{bind_host}")
        self.endpoint = f"tcp://{advertise_host}:{self.port}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="weights-zmq", daemon=True)
        self._thread.start()

    def publish(self, payload: bytes | bytearray, version: int, phase: str, learner_id: str) -> WeightsAnnouncement:
        with self._lock:
            self._payloads[version] = payload
            while len(self._payloads) > self.keep:
                self._payloads.popitem(last=False)
        return WeightsAnnouncement(version=version, phase=phase, learner_id=learner_id, transport="zmq",
                                   location=self.endpoint, size=len(payload),
                                   sha256=hashlib.sha256(payload).hexdigest(), created_at=time.time())

    def _serve(self) -> None:
        while not self._stop.is_set():
            if not self._sock.poll(100):
                continue
            frames = self._sock.recv_multipart(copy=False)
            if len(frames) != 2:
                self._reject("malformed")
                continue
            ident, frame = frames
            try:
                req = decode(frame.buffer, 1 << 16)
            except Rejected as e:
                self._reject(e.reason)
                continue
            if not isinstance(req, FetchWeights):
                self._reject("unexpected")
                continue
            with self._lock:
                payload = self._payloads.get(req.version)
            if payload is None:
                reply = WeightsChunk(version=req.version, offset=req.offset, data=b"",
                                     error=f"version {req.version} no longer served")
            else:
                end = min(len(payload), req.offset + max(0, min(req.length, self.max_chunk)))
                reply = WeightsChunk(version=req.version, offset=req.offset,
                                     data=memoryview(payload)[max(0, req.offset):end])
            self._sock.send_multipart([ident, encode(reply)], copy=False)

    def _reject(self, reason: str) -> None:
        self.rejected += 1
        self._on_reject(reason)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._sock.close(0)


def make_publisher(cfg, run_dir: str, model_dir: str, advertise_host: str, curve=None, on_reject=None):
    """The weight transport of ``learner.weights_transport`` (``cfg``: the LearnerConfig)."""
    if cfg.weights_transport == "disk":
        return DiskPublisher(Path(run_dir) / "weights", model_dir)
    if cfg.weights_transport == "zmq":
        return ZmqPublisher(cfg.bind_host, cfg.weights_port, advertise_host, curve=curve, on_reject=on_reject)
    if cfg.weights_transport == "nccl":
        from .nccl_sync import NcclPublisher

        tied = _tied_aliases(model_dir)
        return NcclPublisher(advertise_host, cfg.nccl_port, backend=cfg.nccl_backend,
                             device="cuda" if cfg.nccl_backend == "nccl" else "cpu", timeout_s=cfg.nccl_timeout_s,
                             dtype=cfg.nccl_dtype, skip=tied)
    raise ValueError(f"learner.weights_transport: unknown transport {cfg.weights_transport!r}")


def _tied_aliases(model_dir: str) -> list[str]:
    """Names a tied model does not need sent (SGLang ties them itself)."""
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return []
    return ["lm_head.weight"] if cfg.get("tie_word_embeddings") else []
