"""NCCL weight transport: the learner broadcasts parameters straight into actors' SGLang engines.

The engine side is SGLang's own (0.5.23, ``srt/model_executor/model_runner_components/
weight_updater.py``): ``init_weights_update_group`` joins a process group at
``tcp://master_address:master_port`` as ranks ``rank_offset + tp_rank`` (rendezvous, then
``PrefixStore(group_name, store)`` and torch's ``_new_process_group_helper``), and
``update_weights_from_distributed(names, dtypes, shapes, group_name)`` allocates one empty tensor per
name and receives ``broadcast(src=0)`` into each, in list order, then loads them by Hugging Face name.
This module is the rank-0 side, built the same way (verl, slime, OpenRLHF and AReaL do likewise).

One group per actor, not one for all: HiMAC actors swap weights between their own groups at
their own times, and a collective over every actor would make them wait for each other; a dead
actor breaks only its own group. The learner hosts one TCPStore on one port; groups are told apart by
their name (the PrefixStore), so only that port and NCCL's own need to be reachable.

Handshake (NcclOffer / NcclPull / NcclPush in protocol/messages.py):
  1. actor -> learner Hello with capabilities ``transport:nccl`` and ``nccl_ranks:<tp_size>``;
  2. learner -> actor ``NcclOffer`` (group name, rendezvous address/port, world size, rank offset,
     backend, timeout, and the manifest: names, dtypes, shapes); the learner starts
     ``NcclBroadcaster.connect(offer)`` in the background and the actor calls
     ``SGLangBackend.init_weights_group(**offer.engine_args())``; both return once joined;
  3. every version: ``WeightsAnnouncement(transport="nccl", location=nccl://host:port,
     size=manifest bytes, sha256=content digest)`` as today;
  4. between its groups the actor sends ``NcclPull(version)``; the learner answers ``NcclPush``
     (the version it is about to send, its digest, or an error) and then broadcasts; the actor, on
     an ``ok`` push, calls ``load_weights(DistributedWeightUpdate(...))``. The actor never enters a
     receive the learner has not promised, and the learner never sends unasked, so neither side
     blocks on a peer that is not there; both sides still have a deadline (``timeout_s``).
A broadcast that misses its deadline aborts and drops the group: the actor must be offered a new one.
"""
from __future__ import annotations

import datetime
import logging
import threading
import time
import uuid
from collections import OrderedDict
from typing import Any, Iterable, Mapping

import torch
import torch.distributed as dist

from himac.protocol import NcclOffer, NcclPull, NcclPush

from .nccl_manifest import Manifest, content_digest, dtype_name, offer_engine_args  # noqa: F401

log = logging.getLogger(__name__)


class NcclSyncError(RuntimeError):
    pass


# --------------------------------------------------------------------------- process groups
def init_custom_process_group(backend: str, store: dist.Store, rank: int, world_size: int, group_name: str,
                              timeout: datetime.timedelta) -> dist.ProcessGroup:
    """A process group outside the default one (the learner's DeepSpeed world, if any), as SGLang
    builds its side: ``store`` is already prefixed with ``group_name``. Uses torch's
    ``_new_process_group_helper`` (torch 2.6+ keyword ``backend_options``), like SGLang does."""
    from torch.distributed.distributed_c10d import Backend, _new_process_group_helper, _world

    pg, _ = _new_process_group_helper(world_size, rank, [], Backend(backend), store, group_name=group_name,
                                      backend_options=None, timeout=timeout)
    _world.pg_group_ranks[pg] = {i: i for i in range(world_size)}  # src=0 means group rank 0
    return pg


def _destroy(pg: dist.ProcessGroup, pending: list | None = None) -> None:
    """Abort ``pg``, let its ``pending`` (work, tensor) pairs end, destroy it. Blocks (gloo: up to the
    group's timeout): run it off the learner's threads. The pending work handles are released here
    only once they have ended, because freeing one that is still pending blocks whoever frees it."""
    try:
        pg.abort()  # NCCL: pending work is cancelled now instead of at the watchdog's timeout
    except Exception:  # noqa: BLE001 - not every backend can abort
        pass
    for work, _ in pending or []:
        try:
            work.wait()
        except Exception:  # noqa: BLE001 - it failed: that is what we wanted to know
            pass
    try:
        dist.destroy_process_group(pg)
    except Exception as e:  # noqa: BLE001
        log.debug("destroy_process_group: %r", e)
    if pending is not None:
        pending.clear()


def _run_with_deadline(fn, timeout_s: float, what: str):
    """Run ``fn`` on a daemon thread; raise NcclSyncError if it has not returned by the deadline."""
    box: dict[str, Any] = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001
            box["error"] = e

    th = threading.Thread(target=target, name=f"nccl-{what}", daemon=True)
    th.start()
    th.join(timeout_s)
    if th.is_alive():
        raise NcclSyncError(f"{what} did not finish within {timeout_s:.0f}s")
    if "error" in box:
        raise NcclSyncError(f"{what} failed: {box['error']!r}") from box["error"]
    return box.get("value")


class NcclBroadcaster:
    """Rank 0 of one weight-update group per actor; hosts the rendezvous store all groups share.

    ``device``: where tensors are staged for the broadcast (a CUDA device for NCCL; CPU for gloo).
    ``dtype``: cast floating tensors to this before sending (e.g. bfloat16: half the bytes; the
    engine copies into its own dtype anyway). ``bucket_bytes``: broadcasts in flight before waiting.
    """

    def __init__(self, advertise_host: str = "127.0.0.1", port: int = 0, backend: str = "nccl",
                 device: str | torch.device | None = None, timeout_s: float = 120.0,
                 dtype: torch.dtype | str | None = None, bucket_bytes: int = 256 << 20):
        self.backend = backend
        self.device = torch.device(device if device is not None else ("cuda" if backend == "nccl" else "cpu"))
        self.timeout_s = timeout_s
        self.dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        self.bucket_bytes = bucket_bytes
        self.advertise_host = advertise_host
        # the server end of every group's rendezvous: SGLang's ranks connect to it as clients
        self.store = dist.TCPStore("0.0.0.0", port, None, True, timeout=datetime.timedelta(seconds=timeout_s),
                                   wait_for_workers=False)
        self.port = self.store.port
        self._groups: dict[str, dist.ProcessGroup] = {}
        self._drops: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._seq = 0

    def offer(self, actor_id: str, manifest: Manifest, engine_ranks: int = 1) -> NcclOffer:
        with self._lock:
            self._seq += 1
            name = f"himac-w-{actor_id}-{self._seq}-{uuid.uuid4().hex[:6]}"
        return NcclOffer(group_name=name, master_address=self.advertise_host, master_port=self.port,
                         world_size=1 + engine_ranks, rank_offset=1, backend=self.backend, timeout_s=self.timeout_s,
                         manifest_sha256=manifest.sha256, **manifest.engine_args())

    def connect(self, offer: NcclOffer, timeout_s: float | None = None) -> None:
        """Join ``offer``'s group as rank 0 while the actor's engine joins it (gloo: blocks until it
        has; NCCL connects lazily, at the first broadcast)."""
        timeout_s = timeout_s or offer.timeout_s
        # the group's own timeout (NCCL watchdog) outlives our deadline so that we abort first
        pg_timeout = datetime.timedelta(seconds=timeout_s + 60)
        pg = _run_with_deadline(lambda: init_custom_process_group(
            offer.backend, dist.PrefixStore(offer.group_name, self.store), 0, offer.world_size, offer.group_name,
            pg_timeout), timeout_s, f"joining weight group {offer.group_name}")
        with self._lock:
            self._groups[offer.group_name] = pg
        log.info("weight group %s: %d rank(s) joined via %s:%d (%s)", offer.group_name, offer.world_size,
                 self.advertise_host, self.port, offer.backend)

    def has_group(self, group_name: str) -> bool:
        return group_name in self._groups

    def broadcast(self, group_name: str, state_dict: Mapping[str, torch.Tensor], manifest: Manifest,
                  timeout_s: float | None = None) -> float:
        """Send ``manifest``'s tensors from ``state_dict``, in order; seconds taken. A peer that
        does not take them by the deadline: the group is aborted and dropped, NcclSyncError."""
        pg = self._groups.get(group_name)
        if pg is None:
            raise NcclSyncError(f"no weight group {group_name!r} (never connected, or dropped)")
        timeout_s = timeout_s or self.timeout_s
        t0 = time.monotonic()
        deadline = t0 + timeout_s
        inflight: list[tuple[Any, torch.Tensor]] = []
        size = 0
        try:
            for name, dt, shape in zip(manifest.names, manifest.dtypes, manifest.shapes):
                t = state_dict[name].detach()
                if tuple(t.shape) != shape:
                    raise NcclSyncError(f"{name}: shape {tuple(t.shape)} != manifest {shape}")
                t = t.to(device=self.device, dtype=getattr(torch, dt)).contiguous()
                inflight.append((dist.broadcast(t, src=0, group=pg, async_op=True), t))
                size += t.numel() * t.element_size()
                if size >= self.bucket_bytes:
                    self._wait(inflight, deadline, group_name)
                    inflight, size = [], 0
            self._wait(inflight, deadline, group_name)
        except NcclSyncError:
            self.drop(group_name, hold=inflight)
            raise
        except Exception as e:
            self.drop(group_name, hold=inflight)
            raise NcclSyncError(f"broadcast to {group_name} failed: {e!r}") from e
        return time.monotonic() - t0

    @staticmethod
    def _wait(inflight: list, deadline: float, group_name: str) -> None:
        for work, _ in inflight:
            while not work.is_completed():
                if time.monotonic() > deadline:
                    raise NcclSyncError(f"broadcast to {group_name}: the engine did not receive before the "
                                        f"deadline; group dropped")
                time.sleep(0.0005)
            work.wait()  # raise what the backend reported

    def drop(self, group_name: str, hold: list | None = None) -> None:
        """Abort and forget a group, off this thread: destroying a group, or freeing the work handles
        of a collective still pending on it (``hold``), blocks until that collective times out."""
        with self._lock:
            pg = self._groups.pop(group_name, None)
        if pg is not None:
            held = list(hold or [])
            if hold is not None:
                hold.clear()
            th = threading.Thread(target=_destroy, args=(pg, held), name=f"drop-{group_name}", daemon=True)
            th.start()
            self._drops = [d for d in self._drops if d.is_alive()] + [th]
            log.info("weight group %s dropped", group_name)

    def close(self, wait_s: float = 10.0) -> None:
        """Drop every group; wait up to ``wait_s`` for their teardown (a process that exits while a
        gloo teardown is still blocked is aborted by the C++ runtime)."""
        for name in list(self._groups):
            self.drop(name)
        deadline = time.monotonic() + wait_s
        for th in self._drops:
            th.join(max(0.0, deadline - time.monotonic()))


# --------------------------------------------------------------------------- learner-side service
class NcclSyncService:
    """What the learner runs for the NCCL transport: snapshots per version, one group per actor,
    broadcasts served one at a time on a worker thread, in the order actors ask."""

    def __init__(self, broadcaster: NcclBroadcaster, keep: int = 2, skip: Iterable[str] = ()):
        self.b = broadcaster
        self.keep = keep
        self.skip = tuple(skip)  # tied aliases not to send (see Manifest.of)
        self._snapshots: OrderedDict[int, tuple[dict[str, torch.Tensor], Manifest, str]] = OrderedDict()
        self._lock = threading.Lock()
        self._jobs: list = []
        self._offered: set[str] = set()  # groups offered and not dropped since
        self._cv = threading.Condition(self._lock)
        self._stop = False
        self.sent = self.failed = 0
        self.last_seconds = 0.0
        self._thread = threading.Thread(target=self._work, name="nccl-sync", daemon=True)
        self._thread.start()

    def publish(self, version: int, state_dict: Mapping[str, torch.Tensor]) -> tuple[Manifest, str]:
        """Keep ``state_dict`` (the learner's own clone) as ``version``; (manifest, content digest)."""
        manifest = Manifest.of(state_dict, self.b.dtype, self.skip)
        digest = content_digest(state_dict)
        with self._lock:
            self._snapshots[version] = (dict(state_dict), manifest, digest)
            while len(self._snapshots) > self.keep:
                self._snapshots.popitem(last=False)
        return manifest, digest

    def latest(self) -> int:
        with self._lock:
            return next(reversed(self._snapshots)) if self._snapshots else -1

    def offer(self, actor_id: str, engine_ranks: int = 1) -> NcclOffer:
        """A new group for ``actor_id``; joining it (rank 0) starts now on the worker thread."""
        with self._lock:
            if not self._snapshots:
                raise NcclSyncError("nothing published yet")
            manifest = self._snapshots[next(reversed(self._snapshots))][1]
        offer = self.b.offer(actor_id, manifest, engine_ranks)
        with self._lock:
            self._offered.add(offer.group_name)
        self._submit(("connect", offer))
        return offer

    def pull(self, req: NcclPull) -> NcclPush:
        """Answer an actor's pull and queue the broadcast of the newest version (>= the one asked)."""
        with self._lock:
            if not self._snapshots:
                return NcclPush(group_name=req.group_name, version=req.version, error="nothing published yet")
            version = next(reversed(self._snapshots))
            snapshot = self._snapshots[version]  # the job holds it: eviction cannot pull it away
            known = req.group_name in self._offered
        if version < req.version:
            return NcclPush(group_name=req.group_name, version=version, error=f"v{req.version} not published yet")
        if not known:
            return NcclPush(group_name=req.group_name, version=version,
                            error=f"no weight group {req.group_name!r}: ask for a new offer")
        self._submit(("broadcast", req.group_name, version, snapshot))
        return NcclPush(group_name=req.group_name, version=version, digest=snapshot[2])

    def _submit(self, job) -> None:
        with self._cv:
            self._jobs.append(job)
            self._cv.notify()

    def _work(self) -> None:
        while True:
            with self._cv:
                while not self._jobs and not self._stop:
                    self._cv.wait()
                if self._stop:
                    return
                job = self._jobs.pop(0)
            try:
                if job[0] == "connect":
                    self.b.connect(job[1])
                else:
                    _, group, version, (sd, manifest, _) = job
                    self.last_seconds = self.b.broadcast(group, sd, manifest)
                    self.sent += 1
            except Exception as e:  # noqa: BLE001 - the actor's receive fails too; it asks for a new offer
                self.failed += 1
                group = job[1].group_name if job[0] == "connect" else job[1]
                self.b.drop(group)
                with self._lock:
                    self._offered.discard(group)
                log.error("nccl weight sync %s: %s", job[0], e)

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout=5)
        self.b.close()


class NcclPublisher:
    """The ``nccl`` weight transport, with the publishers' interface (``prepare`` / ``publish``) plus the
    learner server's two hooks (``offer`` on an actor's hello, ``pull`` on its NcclPull)."""

    transport = "nccl"

    def __init__(self, advertise_host: str, port: int = 0, backend: str = "nccl", device: str | None = None,
                 timeout_s: float = 120.0, dtype: str = "bfloat16", skip: Iterable[str] = ()):
        self.service = NcclSyncService(NcclBroadcaster(advertise_host, port, backend=backend, device=device,
                                                       timeout_s=timeout_s, dtype=dtype), skip=skip)
        self.location = f"nccl://{advertise_host}:{self.service.b.port}"

    def prepare(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The snapshot this version broadcasts (clones: training goes on meanwhile)."""
        return {k: v.detach().clone() for k, v in state_dict.items()}

    def publish(self, snapshot: Mapping[str, torch.Tensor], version: int, phase: str, learner_id: str):
        from himac.protocol import WeightsAnnouncement

        manifest, digest = self.service.publish(version, snapshot)
        # for nccl, size is the bytes broadcast and sha256 the learner's weights digest of what is sent
        return WeightsAnnouncement(version=version, phase=phase, learner_id=learner_id, transport="nccl",
                                   location=self.location, size=manifest.nbytes, sha256=digest,
                                   created_at=time.time())

    def offer(self, actor_id: str, engine_ranks: int = 1) -> NcclOffer:
        return self.service.offer(actor_id, engine_ranks)

    def pull(self, req: NcclPull) -> NcclPush:
        return self.service.pull(req)

    def close(self) -> None:
        self.service.close()

