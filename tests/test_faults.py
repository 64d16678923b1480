"""Reliability with real processes: kill -9 actors and the learner (also mid-checkpoint), pause the
learner with SIGSTOP, and count every group id on both sides: nothing lost, nothing counted twice."""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from conftest import free_port, himac_cmd, start, wait_for

GRPO_SMALL = """
algo: {{name: grpo, group_size: 2}}
rollout: {{max_new_tokens: 12}}
env: {{sokoban: {{max_steps: 6}}}}
learner: {{port: {port}, pub_port: {pub}, steps: {steps}, batch_groups: 2, checkpoint_every: {ckpt},
          credits_per_actor: 2, kl_beta: 0.0}}
actor: {{learner: "tcp://127.0.0.1:{port}", heartbeat_s: 0.3, learner_timeout_s: 3.0, resend_after_s: 20.0}}
"""


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def write_config(out: Path, model: str, steps: int, ckpt: int = 0) -> tuple[Path, int]:
    port = free_port()
    cfg = out / "config.yaml"
    cfg.write_text(f"out: {out}\nmodel: {model}\n" + GRPO_SMALL.format(port=port, pub=free_port(), steps=steps,
                                                                        ckpt=ckpt))
    return cfg, port


def stop_all(procs, sig=signal.SIGTERM):
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, sig)
    for p in procs:
        try:
            p.wait(timeout=30)
        except Exception:
            os.killpg(p.pid, signal.SIGKILL)


def sent_and_pending(out: Path, actors) -> tuple[list[str], set[str]]:
    sent, pending = [], set()
    for a in actors:
        work = out / "actors" / a
        sent += [e["group_id"] for e in jsonl(work / "sent.jsonl")]
        pending |= {p.stem for p in (work / "spool").glob("*.group")}
    return sent, pending


def check_exactly_once(out: Path, actors) -> dict:
    ledger = jsonl(out / "groups.jsonl")
    received = [e["group_id"] for e in ledger if e["status"] != "duplicate"]
    sent, pending = sent_and_pending(out, actors)
    assert len(received) == len(set(received)), "a group was accepted twice"
    assert set(sent) <= set(received) | pending, f"lost: {sorted(set(sent) - set(received) - pending)[:5]}"
    assert set(received) <= set(sent), "the learner received a group no actor sent"
    return {"sent": len(set(sent)), "received": len(received), "pending": len(pending - set(received)),
            "duplicates": sum(e["status"] == "duplicate" for e in ledger)}


def test_kill_actor_while_sending_loses_and_duplicates_nothing(tiny_model, tmp_path):
    out = tmp_path
    cfg, _ = write_config(out, tiny_model, steps=100000)
    learner = start(himac_cmd("learner", "--config", str(cfg), "--quiet"), out / "learner.log")
    actor_cmd = himac_cmd("actor", "--config", str(cfg), "--actor-id", "actor-0")
    victim = start(actor_cmd, out / "actor-0.log")
    other = start(himac_cmd("actor", "--config", str(cfg), "--actor-id", "actor-1"), out / "actor-1.log")
    sent_log = out / "actors" / "actor-0" / "sent.jsonl"
    kills = 0
    try:
        for _ in range(3):
            n = len(jsonl(sent_log))
            wait_for(lambda: len(jsonl(sent_log)) > n, 240, "actor-0 to send a group", interval=0.02,
                     procs=[learner, victim])
            os.killpg(victim.pid, signal.SIGKILL)  # right after it spooled and sent: its ack is in flight
            victim.wait()
            kills += 1
            victim = start(actor_cmd, out / "actor-0.log")  # same id, new incarnation
        n = len(jsonl(sent_log))
        wait_for(lambda: len(jsonl(sent_log)) >= n + 2, 240, "the restarted actor to work", procs=[learner, victim])
        stop_all([victim, other])
        stop_all([learner])
    finally:
        stop_all([victim, other, learner], signal.SIGKILL)
    counts = check_exactly_once(out, ["actor-0", "actor-1"])
    incarnations = {gid.split(".")[1] for gid in (e["group_id"] for e in jsonl(sent_log))}
    assert kills == 3 and len(incarnations) == 4
    assert counts["sent"] > 0
    print(f"\nactor kills: {kills}, {counts}")


def test_kill_learner_between_and_during_checkpoints_and_resume(tiny_model, tmp_path):
    out, steps = tmp_path, 12
    cfg, _ = write_config(out, tiny_model, steps=steps, ckpt=2)
    slow_save = {"HIMAC_FAULT_CHECKPOINT_PAUSE_S": "1.5"}
    learner_cmd = himac_cmd("learner", "--config", str(cfg), "--quiet", "--resume")
    learner = start(learner_cmd, out / "learner.log", slow_save)
    actors = [start(himac_cmd("actor", "--config", str(cfg), "--actor-id", f"actor-{i}"), out / f"actor-{i}.log")
              for i in range(2)]
    actor_pids = [a.pid for a in actors]
    ckpts = out / "checkpoints"
    learner_ids = []
    try:
        # 1. kill -9 during a save: the folder is still a temp one; `latest` must not point at it
        wait_for(lambda: list(ckpts.glob(".tmp-step*")), 300, "a checkpoint save in progress", interval=0.02,
                 procs=[learner, *actors])
        learner_ids.append(json.loads((out / "learner.json").read_text())["learner_id"])
        os.killpg(learner.pid, signal.SIGKILL)
        learner.wait()
        latest = (ckpts / "latest").read_text().strip() if (ckpts / "latest").exists() else None
        assert latest is None or (ckpts / latest / "state.json").exists()
        learner = start(learner_cmd, out / "learner.log", slow_save)
        # 2. kill -9 between saves: just after an odd step (no save pending)
        def odd_step_done():
            rows = jsonl(out / "metrics.jsonl")
            return rows and rows[-1]["step"] % 2 == 1 and rows[-1]["step"] >= 3 and not list(ckpts.glob(".tmp-*"))
        wait_for(odd_step_done, 300, "an odd step", interval=0.05, procs=[learner, *actors])
        learner_ids.append(json.loads((out / "learner.json").read_text())["learner_id"])
        os.killpg(learner.pid, signal.SIGKILL)
        learner.wait()
        learner = start(learner_cmd, out / "learner.log", slow_save)
        wait_for(lambda: learner.poll() is not None, 400, "the resumed learner to finish", procs=actors)
        assert learner.returncode == 0, (out / "learner.log").read_text()[-3000:]
        learner_ids.append(json.loads((out / "learner.json").read_text())["learner_id"])
        # the actors were never restarted, and they follow the resumed learner to the final version
        assert [a.poll() for a in actors] == [None, None] and [a.pid for a in actors] == actor_pids
        summary = json.loads((out / "learner_summary.json").read_text())
        wait_for(lambda: all(json.loads((out / "actors" / f"actor-{i}" / "status.json").read_text())["held_version"]
                             == steps for i in range(2)), 120, "actors to hold the final version", procs=actors)
        for i in range(2):
            assert json.loads((out / "actors" / f"actor-{i}" / "status.json").read_text())["digest"] == \
                summary["weights_digest"]
        stop_all(actors)
    finally:
        stop_all([learner, *actors], signal.SIGKILL)
    rows = jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, steps + 1)), "version sequence broken"
    assert [r["policy_version"] for r in rows] == list(range(1, steps + 1))
    consumed = [g for r in jsonl(out / "consumed.jsonl") for g in r["group_ids"]]
    assert len(consumed) == len(set(consumed)) == 2 * steps, "a group was consumed twice (or lost)"
    assert len(set(learner_ids)) == 3
    counts = check_exactly_once_across_restarts(out)
    print(f"\nlearner kills: 2 (1 during a save), {counts}")


def check_exactly_once_across_restarts(out: Path) -> dict:
    """Across learner restarts the ledger legitimately sees a group twice (accepted, then the learner died
    before its checkpoint consumed it, and the resumed learner replays it from the inbox); what must hold
    is the final consumption: each group id at most once, every sent group received or still spooled."""
    ledger = jsonl(out / "groups.jsonl")
    received = {e["group_id"] for e in ledger if e["status"] != "duplicate"}
    sent, pending = sent_and_pending(out, ["actor-0", "actor-1"])
    assert set(sent) <= received | pending
    assert received <= set(sent)
    return {"sent": len(set(sent)), "received": len(received), "duplicate_acks": sum(e["status"] == "duplicate"
                                                                                     for e in ledger)}


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def test_paused_learner_bounds_actor_memory(tiny_model, tmp_path):
    out = tmp_path
    pause_s = float(os.environ.get("HIMAC_TEST_PAUSE_S", "20"))
    cfg, _ = write_config(out, tiny_model, steps=100000)
    learner = start(himac_cmd("learner", "--config", str(cfg), "--quiet"), out / "learner.log")
    actor = start(himac_cmd("actor", "--config", str(cfg), "--actor-id", "actor-0"), out / "actor-0.log")
    sent_log = out / "actors" / "actor-0" / "sent.jsonl"
    try:
        wait_for(lambda: len(jsonl(out / "metrics.jsonl")) >= 2, 300, "two learner steps", procs=[learner, actor])
        os.killpg(learner.pid, signal.SIGSTOP)
        time.sleep(2)  # let in-flight acks settle
        before_rss, before_sent = rss_kb(actor.pid), len(jsonl(sent_log))
        time.sleep(pause_s)
        after_rss, after_sent = rss_kb(actor.pid), len(jsonl(sent_log))
        os.killpg(learner.pid, signal.SIGCONT)
        steps_then = len(jsonl(out / "metrics.jsonl"))
        wait_for(lambda: len(jsonl(out / "metrics.jsonl")) > steps_then, 120, "training to resume",
                 procs=[learner, actor])
    finally:
        stop_all([actor, learner], signal.SIGKILL)
    # without credit the actor stops generating: at most its window (2) of new groups during the pause
    assert after_sent - before_sent <= 2
    assert after_rss - before_rss < 30_000, f"actor RSS grew {before_rss} -> {after_rss} kB during the pause"
    print(f"\nactor RSS {before_rss / 1024:.1f} MB -> {after_rss / 1024:.1f} MB over a {pause_s:.0f}s learner pause; "
          f"groups sent during the pause: {after_sent - before_sent}")
