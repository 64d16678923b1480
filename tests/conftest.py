"""Shared fixtures: small models built locally (no hub), free ports, subprocess helpers."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from himac.protocol.config import load_config

ROOT = Path(__file__).resolve().parents[1]
# DeepSpeed builds one small op on first use; keep it between runs (CI caches this folder)
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "himac" / "torch_extensions"))
os.environ.setdefault("OMP_NUM_THREADS", "1")


DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A Sokoban tiny model with a short format warm-up: enough for plumbing tests."""
    from himac.cli.init_model import init_model

    out = tmp_path_factory.mktemp("tiny-model")
    init_model(str(out), load_config(), warmup_steps=40, warmup_episodes=40, seed=0)
    return str(out)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def himac_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "himac.cli.main", *args]


def start(cmd: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    # a child is its own process group unless a test says otherwise: in-process engines in this
    # pytest may have set torch.distributed variables that must not leak into it
    inherited = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    e = {**inherited, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.Popen(cmd, stdout=open(log, "ab"), stderr=subprocess.STDOUT, env=e, start_new_session=True)
    proc.log_path = log  # so a failure can show what the process said
    return proc


def log_tail(proc, lines: int = 40) -> str:
    path = getattr(proc, "log_path", None)
    if path is None or not Path(path).exists():
        return ""
    text = Path(path).read_text(errors="replace").splitlines()[-lines:]
    return f"\n--- last lines of {path} ---\n" + "\n".join(text)


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2, procs=()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        for p in procs:
            if p.poll() not in (None, 0):
                raise AssertionError(f"a process exited with {p.returncode} while waiting for {what}" + log_tail(p))
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}" + "".join(log_tail(p, 20) for p in procs))
