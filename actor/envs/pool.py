"""A pool of environments stepped as a group: in-process, or spread over worker subprocesses.

The actor runs a group of N episodes of one task in lockstep, so it resets / steps N envs at once.
With ``workers=k > 0`` the envs live in k subprocesses (env ``i`` in worker ``i % k``) and every
call fans out over pipes, so slow envs (ALFWorld resets take seconds) run in parallel and, through
``reset_async`` / ``step_async``, overlap with LLM generation in the actor.

Workers start with ``spawn``: the actor holds torch threads, and forking a threaded process can
deadlock. A dead or hung worker raises ``EnvPoolError`` in the caller (the pool is then broken:
close it); an exception inside an env comes back as ``EnvWorkerError`` carrying the worker's
traceback text, and the pool stays usable.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import signal
import time
import traceback
import weakref
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any, Callable, Sequence

import msgspec

from himac.protocol.config import EnvConfig

from . import make_env
from .base import Env, Observation, StepResult

log = logging.getLogger(__name__)

_CLOSE_GRACE_S = 5.0  # a worker gets this long to exit on "close" before it is terminated


@dataclass
class EnvSnapshot:
    """Everything the rollout needs after a reset, in one round-trip."""

    observation: Observation
    instruction: str
    task_type: str
    state_key: str


class EnvPoolError(RuntimeError):
    """The pool cannot go on: a worker died or timed out, or the pool is closed."""


class EnvWorkerError(RuntimeError):
    """An environment raised inside a worker; the message holds the worker's traceback."""


# --------------------------------------------------------------------------- the work itself
def _reset_envs(envs: list[Env], jobs: Sequence[tuple[int, str]]) -> list[EnvSnapshot]:
    out = []
    for i, task_id in jobs:
        obs = envs[i].reset(task_id)
        out.append(EnvSnapshot(obs, envs[i].instruction(), envs[i].task_type(), envs[i].state_key()))
    return out


def _step_envs(envs: list[Env], jobs: Sequence[tuple[int, str]]) -> list[tuple[StepResult, str]]:
    return [(envs[i].step(action), envs[i].state_key()) for i, action in jobs]


_COMMANDS: dict[str, Callable[[list[Env], Sequence[tuple[int, str]]], list]] = {
    "reset": _reset_envs,
    "step": _step_envs,
}


def _worker_main(conn: Connection, cfg_json: bytes, num_envs: int) -> None:
    """Subprocess loop: build the envs, then answer (command, jobs) with ("ok", out) or ("err", tb)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it closes us
    envs: list[Env] = []
    try:
        cfg = msgspec.json.decode(cfg_json, type=EnvConfig)
        envs = [make_env(cfg) for _ in range(num_envs)]
        conn.send(("ready", None))
        while True:
            try:
                command, jobs = conn.recv()
            except (EOFError, OSError):
                break  # the parent is gone
            if command == "close":
                break
            try:
                conn.send(("ok", _COMMANDS[command](envs, jobs)))
            except Exception:
                conn.send(("err", traceback.format_exc()))
    except Exception:
        try:
            conn.send(("err", traceback.format_exc()))
        except Exception:
            pass
    finally:
        for env in envs:
            try:
                env.close()
            except Exception:
                pass
        conn.close()


class _Worker:
    def __init__(self, ctx, index: int, cfg_json: bytes, num_envs: int):
        self.index = index
        self.conn, child_conn = ctx.Pipe(duplex=True)
        self.process = ctx.Process(target=_worker_main, args=(child_conn, cfg_json, num_envs),
                                   name=f"himac-env-worker-{index}", daemon=True)
        self.process.start()
        child_conn.close()  # only the child holds its end now: its death reads as EOF here

    def receive(self, deadline: float | None) -> tuple[str, Any]:
        """The worker's next reply; EnvPoolError if it dies or the deadline passes first."""
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready = wait([self.conn, self.process.sentinel], timeout)
        if self.conn in ready:
            try:
                return self.conn.recv()
            except (EOFError, OSError):
                pass  # the pipe closed: the worker died; fall through to the report
        if not ready:
            raise EnvPoolError(f"env worker {self.index} (pid {self.process.pid}) did not answer in time")
        self.process.join(1.0)
        raise EnvPoolError(f"env worker {self.index} (pid {self.process.pid}) died "
                           f"(exit code {self.process.exitcode})")


def _shutdown(workers: list[_Worker]) -> None:
    """Close every worker: ask, wait, then terminate / kill; never leaves a zombie."""
    for w in workers:
        if w.process.is_alive():
            try:
                w.conn.send(("close", None))
            except Exception:
                pass
    deadline = time.monotonic() + _CLOSE_GRACE_S
    for w in workers:
        w.process.join(max(0.0, deadline - time.monotonic()))
        if w.process.is_alive():
            w.process.terminate()
            w.process.join(1.0)
        if w.process.is_alive():
            w.process.kill()
            w.process.join()
        w.conn.close()


# --------------------------------------------------------------------------- futures
class _Ready:
    """A result computed at once (in-process pool); exceptions surface at ``result()``."""

    def __init__(self, fn: Callable[[], list]):
        self._value: list | None = None
        self._error: BaseException | None = None
        try:
            self._value = fn()
        except Exception as e:
            self._error = e

    def done(self) -> bool:
        return True

    def result(self, timeout: float | None = None) -> list:
        if self._error is not None:
            raise self._error
        assert self._value is not None
        return self._value


class PendingResult:
    """Replies still on their way from the workers; ``result()`` gathers them in request order."""

    def __init__(self, pool: "EnvPool", parts: list[tuple[_Worker, list[int]]], size: int):
        self._pool, self._parts, self._size = pool, parts, size
        self._value: list | None = None
        self._error: BaseException | None = None

    def done(self) -> bool:
        return self._value is not None or self._error is not None or all(w.conn.poll() for w, _ in self._parts)

    def result(self, timeout: float | None = None) -> list:
        """Wait for every reply (``timeout`` defaults to the pool's); raise the first error."""
        if self._value is None and self._error is None:
            self._collect(self._pool.timeout_s if timeout is None else timeout)
        if self._error is not None:
            raise self._error
        assert self._value is not None
        return self._value

    def _collect(self, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        out: list[Any] = [None] * self._size
        first_error: BaseException | None = None
        for worker, positions in self._parts:  # read every reply, even after an error: pipes stay in sync
            try:
                status, payload = worker.receive(deadline)
            except EnvPoolError as e:
                self._pool._broken = str(e)
                self._error = e
                raise
            if status == "ok":
                for pos, item in zip(positions, payload):
                    out[pos] = item
            elif first_error is None:
                first_error = EnvWorkerError(f"env worker {worker.index} raised:\n{payload}")
        if self._pool._pending is self:
            self._pool._pending = None
        if first_error is not None:
            self._error = first_error
        else:
            self._value = out


# --------------------------------------------------------------------------- pool
class EnvPool:
    """``size`` envs of ``env_cfg``; ``workers`` subprocesses (0 = in this process; default env_cfg.workers).

    With workers, ``*_async`` sends the request and returns at once; one request is in flight at a
    time (a new call first waits for the previous one). In-process, ``*_async`` runs the work
    eagerly and only the error, if any, waits for ``result()``.
    """

    def __init__(self, env_cfg: EnvConfig, size: int, workers: int | None = None, timeout_s: float | None = 600.0):
        if size < 1:
            raise ValueError(f"EnvPool: size must be >= 1, got {size}")
        workers = env_cfg.workers if workers is None else workers
        if workers < 0:
            raise ValueError(f"EnvPool: workers must be >= 0, got {workers}")
        self.size = size
        self.num_workers = min(workers, size)  # an idle worker would only cost memory
        self.timeout_s = timeout_s  # per call; None waits forever (a dead worker is still noticed)
        self._envs: list[Env] = []
        self._workers: list[_Worker] = []
        self._pending: PendingResult | None = None
        self._broken: str | None = None
        self._closed = False
        if self.num_workers == 0:
            self._envs = [make_env(env_cfg) for _ in range(size)]
            self._finalizer = weakref.finalize(self, _close_envs, self._envs)
            return
        ctx = mp.get_context("spawn")
        cfg_json = msgspec.json.encode(env_cfg)
        k = self.num_workers
        self._workers = [_Worker(ctx, w, cfg_json, len(range(w, size, k))) for w in range(k)]
        self._finalizer = weakref.finalize(self, _shutdown, self._workers)
        t0 = time.monotonic()
        deadline = None if timeout_s is None else t0 + timeout_s
        try:
            for w in self._workers:  # they start in parallel; wait for all to report ready
                status, payload = w.receive(deadline)
                if status != "ready":
                    raise EnvWorkerError(f"env worker {w.index} failed to build its envs:\n{payload}")
        except BaseException:
            self.close()
            raise
        log.info("env pool: %d %s envs over %d workers, started in %.2fs", size, env_cfg.name, k,
                 time.monotonic() - t0)

    # ------------------------------------------------------------------ API
    def reset(self, task_ids: Sequence[str]) -> list[EnvSnapshot]:
        """Reset env i to task_ids[i] (envs 0..len-1 when fewer than size)."""
        return self.reset_async(task_ids).result()

    def step(self, actions: Sequence[tuple[int, str]]) -> list[tuple[StepResult, str]]:
        """Step only the listed envs: (env index, action) -> (result, new state key), in order."""
        return self.step_async(actions).result()

    def reset_async(self, task_ids: Sequence[str]) -> PendingResult | _Ready:
        if len(task_ids) > self.size:
            raise ValueError(f"EnvPool.reset: {len(task_ids)} task ids for a pool of {self.size} envs")
        return self._submit("reset", list(enumerate(task_ids)))

    def step_async(self, actions: Sequence[tuple[int, str]]) -> PendingResult | _Ready:
        seen: set[int] = set()
        for i, _ in actions:
            if not 0 <= i < self.size or i in seen:
                raise ValueError(f"EnvPool.step: env index {i} out of range or listed twice (size {self.size})")
            seen.add(i)
        return self._submit("step", list(actions))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._finalizer()  # runs once: closes the envs or shuts the workers down

    def __enter__(self) -> "EnvPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ internals
    def _submit(self, command: str, jobs: list[tuple[int, str]]) -> PendingResult | _Ready:
        if self._closed:
            raise EnvPoolError("EnvPool is closed")
        if self._broken:
            raise EnvPoolError(f"EnvPool is broken ({self._broken}); close it and build a new one")
        if not self._workers:
            return _Ready(lambda: _COMMANDS[command](self._envs, jobs))
        if self._pending is not None:  # one request in flight at a time: replies come back in order
            try:
                self._pending.result()
            except EnvWorkerError:
                pass  # that env error belongs to the earlier request's future
        k = self.num_workers
        per_worker: dict[int, tuple[list[tuple[int, str]], list[int]]] = {}
        for pos, (i, arg) in enumerate(jobs):
            local_jobs, positions = per_worker.setdefault(i % k, ([], []))
            local_jobs.append((i // k, arg))
            positions.append(pos)
        parts = []
        for w_index, (local_jobs, positions) in per_worker.items():
            worker = self._workers[w_index]
            try:
                worker.conn.send((command, local_jobs))
            except (BrokenPipeError, OSError) as e:
                self._broken = f"env worker {w_index} is gone: {e}"
                raise EnvPoolError(self._broken) from None
            parts.append((worker, positions))
        pending = PendingResult(self, parts, len(jobs))
        self._pending = pending
        return pending

    @property
    def worker_pids(self) -> list[int]:
        return [w.process.pid for w in self._workers if w.process.pid is not None]


def _close_envs(envs: list[Env]) -> None:
    for env in envs:
        try:
            env.close()
        except Exception:
            log.exception("env close failed")
