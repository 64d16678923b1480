"""EnvPool: in-process and subprocess workers agree; async calls; dead workers and env errors surface."""
from __future__ import annotations

import os
import random
import signal
import time

import pytest

from himac.actor.envs.pool import EnvPool, EnvPoolError, EnvSnapshot, EnvWorkerError
from himac.protocol.config import EnvConfig, SokobanConfig

CFG = EnvConfig(name="sokoban", sokoban=SokobanConfig(max_steps=12))
SIZE = 5


def play(pool: EnvPool, task_ids: list[str], seed: int) -> list:
    """Run a lockstep group to the end with seeded random actions; return everything observed."""
    rng = random.Random(seed)
    trace: list = []
    snaps = pool.reset(task_ids)
    trace.append([(s.observation.text, s.instruction, s.task_type, s.state_key) for s in snaps])
    active = list(range(len(task_ids)))
    while active:
        actions = [(i, rng.choice(["up", "down", "left", "right", "Up ", "bogus"])) for i in active]
        rng.shuffle(actions)  # any order: results come back in the order asked
        results = pool.step(actions)
        trace.append([(i, a, r.observation.text, r.reward, r.done, r.won, r.invalid, key)
                      for (i, a), (r, key) in zip(actions, results)])
        active = [i for (i, _), (r, _) in zip(actions, results) if not r.done]
    return trace


@pytest.fixture(scope="module")
def worker_pool():
    with EnvPool(CFG, size=SIZE, workers=2, timeout_s=20) as pool:
        yield pool


def test_in_process_and_workers_agree(worker_pool):
    tasks = [f"sokoban/6x6b1d30/train/{s}" for s in (3, 3, 3, 8, 11)]
    with EnvPool(CFG, size=SIZE, workers=0) as local:
        assert local.num_workers == 0 and local.size == SIZE
        for seed in range(3):
            assert play(local, tasks, seed) == play(worker_pool, tasks, seed)
    # a group of the same task replays one room
    snaps = worker_pool.reset(["sokoban/6x6b2d30/test/5"] * 3)  # fewer than size: envs 0..2
    assert len(snaps) == 3 and isinstance(snaps[0], EnvSnapshot)
    assert len({s.observation.text for s in snaps}) == 1 and snaps[0].task_type == "6x6b2"


def test_async_reset_returns_at_once(worker_pool):
    t0 = time.perf_counter()
    pending = worker_pool.reset_async([f"sokoban/6x6b1d30/train/{s}" for s in range(SIZE)])
    assert time.perf_counter() - t0 < 0.05
    snaps = pending.result()
    assert pending.done() and len(snaps) == SIZE
    stepped = worker_pool.step_async([(4, "left"), (0, "right")]).result()
    assert [key for _, key in stepped] and len(stepped) == 2
    # a new call before result(): the earlier request is drained first, its result still there
    first = worker_pool.step_async([(1, "up")])
    second = worker_pool.step_async([(1, "down")])
    assert len(first.result()) == 1 and len(second.result()) == 1


def test_env_error_comes_back_with_traceback_and_pool_survives(worker_pool):
    with pytest.raises(EnvWorkerError, match="bad task id"):
        worker_pool.reset(["sokoban/not-a-task"])
    with pytest.raises(ValueError):
        worker_pool.step([(0, "up"), (0, "down")])  # the same env twice
    assert len(worker_pool.reset(["sokoban/6x6b1d30/train/1"] * SIZE)) == SIZE  # still usable


def test_in_process_errors_surface_at_result():
    with EnvPool(CFG, size=2, workers=0) as pool:
        pending = pool.reset_async(["sokoban/not-a-task"])
        with pytest.raises(ValueError, match="bad task id"):
            pending.result()


def test_killed_worker_raises_not_hangs():
    pool = EnvPool(CFG, size=4, workers=2, timeout_s=10)
    try:
        pool.reset(["sokoban/6x6b1d30/train/0"] * 4)
        victim = pool.worker_pids[1]
        os.kill(victim, signal.SIGKILL)
        t0 = time.perf_counter()
        with pytest.raises(EnvPoolError, match="died"):
            pool.step([(i, "up") for i in range(4)])
        assert time.perf_counter() - t0 < 5
        with pytest.raises(EnvPoolError, match="broken"):
            pool.step([(0, "up")])
    finally:
        procs = [w.process for w in pool._workers]
        pool.close()
    assert all(not p.is_alive() and p.exitcode is not None for p in procs)  # reaped: no zombies


def test_close_reaps_workers():
    pool = EnvPool(CFG, size=3, workers=3)
    procs = [w.process for w in pool._workers]
    assert len(procs) == 3 and all(p.is_alive() for p in procs)
    pool.close()
    pool.close()  # idempotent
    assert all(p.exitcode == 0 for p in procs)
    with pytest.raises(EnvPoolError, match="closed"):
        pool.reset(["sokoban/6x6b1d30/train/0"])


def test_hung_worker_times_out():
    pool = EnvPool(CFG, size=2, workers=2, timeout_s=0.5)
    try:
        pool.reset(["sokoban/6x6b1d30/train/0"] * 2)
        victim = pool.worker_pids[0]
        os.kill(victim, signal.SIGSTOP)
        t0 = time.perf_counter()
        with pytest.raises(EnvPoolError, match="did not answer in time"):
            pool.step([(0, "up"), (1, "up")])
        assert time.perf_counter() - t0 < 2
        os.kill(victim, signal.SIGCONT)
    finally:
        procs = [w.process for w in pool._workers]
        pool.close()
    assert all(not p.is_alive() for p in procs)
