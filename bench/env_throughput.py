"""Environment throughput: steps/s and reset latency, one env in-process vs an EnvPool of k workers.

Random admissible actions (``Observation.admissible`` when the env gives a list, else a per-env
fallback), episodes played to the end. The pool runs groups of ``--group`` episodes of one task
in lockstep, as the actor does. Figures only, no asserts.

    python bench/env_throughput.py --env sokoban --episodes 400 --workers 2
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

from himac.actor.envs import make_env
from himac.actor.envs.base import Observation
from himac.actor.envs.pool import EnvPool
from himac.protocol.config import load_config

# when an env gives no admissible list: something every env at least parses
FALLBACK_ACTIONS = {"sokoban": ["up", "down", "left", "right"], "webshop": ["search[shirt]", "click[back to search]"],
                    "alfworld": ["look", "inventory"]}


def pick_action(obs: Observation, env_name: str, rng: random.Random) -> str:
    return rng.choice(obs.admissible or FALLBACK_ACTIONS.get(env_name, ["look"]))


def latency_line(name: str, seconds: list[float]) -> str:
    ms = sorted(s * 1e3 for s in seconds)
    p = lambda q: ms[min(len(ms) - 1, int(q * len(ms)))]  # noqa: E731
    return f"{name:<28} n={len(ms):<5} mean {statistics.mean(ms):8.3f} ms  p50 {p(0.5):8.3f} ms  p95 {p(0.95):8.3f} ms"


def bench_single(cfg, episodes: int, seed: int) -> dict:
    """One env in this process: the baseline."""
    env = make_env(cfg)
    rng = random.Random(seed)
    resets, steps, step_time = [], 0, 0.0
    for _ in range(episodes):
        task = env.sample_task(cfg.split, rng)
        t0 = time.perf_counter()
        obs = env.reset(task)
        resets.append(time.perf_counter() - t0)
        done = False
        while not done:
            action = pick_action(obs, cfg.name, rng)
            t0 = time.perf_counter()
            res = env.step(action)
            step_time += time.perf_counter() - t0
            obs, done, steps = res.observation, res.done, steps + 1
    env.close()
    return {"resets": resets, "steps": steps, "step_s": step_time}


def bench_pool(cfg, episodes: int, group: int, workers: int, seed: int) -> dict:
    """Groups of `group` episodes of one task, reset and stepped in lockstep through an EnvPool."""
    rng = random.Random(seed)
    task_env = make_env(cfg)  # only to sample task ids
    resets, steps, step_time = [], 0, 0.0
    t_start = time.perf_counter()
    with EnvPool(cfg, size=group, workers=workers) as pool:
        startup = time.perf_counter() - t_start
        for _ in range(max(1, episodes // group)):
            task = task_env.sample_task(cfg.split, rng)
            t0 = time.perf_counter()
            snaps = pool.reset([task] * group)
            resets.append(time.perf_counter() - t0)
            obs = {i: s.observation for i, s in enumerate(snaps)}
            while obs:
                actions = [(i, pick_action(o, cfg.name, rng)) for i, o in obs.items()]
                t0 = time.perf_counter()
                results = pool.step(actions)
                step_time += time.perf_counter() - t0
                steps += len(actions)
                obs = {i: r.observation for (i, _), (r, _) in zip(actions, results) if not r.done}
    task_env.close()
    return {"resets": resets, "steps": steps, "step_s": step_time, "startup_s": startup}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--env", choices=["sokoban", "alfworld", "webshop"], default="sokoban")
    ap.add_argument("--episodes", type=int, default=400)
    ap.add_argument("--workers", type=int, default=2, help="subprocesses of the pool run")
    ap.add_argument("--group", type=int, default=8, help="episodes of one task stepped in lockstep")
    ap.add_argument("--config", default=None, help="run config file whose env section to use")
    ap.add_argument("--split", default="train")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    cfg = load_config(args.config, {"env.name": args.env, "env.split": args.split}).env
    print(f"env={args.env} split={args.split} episodes={args.episodes} group={args.group} workers={args.workers}")
    single = bench_single(cfg, args.episodes, args.seed)
    runs = {"single env": single, "pool in-process": bench_pool(cfg, args.episodes, args.group, 0, args.seed)}
    if args.workers > 0:
        runs[f"pool {args.workers} workers"] = bench_pool(cfg, args.episodes, args.group, args.workers, args.seed)

    print("\nsteps/s (env time only)")
    for name, r in runs.items():
        extra = f"  (startup {r['startup_s']:.2f} s)" if "startup_s" in r else ""
        print(f"  {name:<26} {r['steps'] / r['step_s']:12,.0f} steps/s  over {r['steps']} steps{extra}")
    print("\nreset latency")
    print("  " + latency_line("single env, one reset", single["resets"]))
    for name, r in list(runs.items())[1:]:
        print("  " + latency_line(f"{name}, group of {args.group}", r["resets"]))

    pool_name = list(runs)[-1]
    sps = {name: r["steps"] / r["step_s"] for name, r in runs.items()}
    print(f"\nsummary: {args.env}: single {sps['single env']:,.0f} steps/s, {pool_name} {sps[pool_name]:,.0f} "
          f"steps/s ({sps[pool_name] / sps['single env']:.2f}x); reset p50 "
          f"{sorted(single['resets'])[len(single['resets']) // 2] * 1e3:.2f} ms single, "
          f"{sorted(runs[pool_name]['resets'])[len(runs[pool_name]['resets']) // 2] * 1e3:.2f} ms per group")


if __name__ == "__main__":
    main()
