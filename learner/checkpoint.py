"""Atomic learner checkpoints: DeepSpeed state + what the loop needs to resume exactly.

Layout: ``RUN/checkpoints/step000040/{ds/..., state.json, rng.pt}`` and ``RUN/checkpoints/latest``
(the tag of the newest complete one). A checkpoint is written to a temp folder, renamed into
place, and only then named in ``latest`` (itself replaced atomically), so a kill at any moment
leaves the previous checkpoint usable.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from .engine import PolicyEngine

# Tests set this to hold a save open between DeepSpeed's write and the atomic rename.
FAULT_PAUSE_S = float(os.environ.get("HIMAC_FAULT_CHECKPOINT_PAUSE_S", "0") or 0)


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


class Checkpointer:
    def __init__(self, directory: str | os.PathLike, keep: int = 2):
        self.dir = Path(directory)
        self.keep = keep

    def latest(self) -> Path | None:
        pointer = self.dir / "latest"
        if not pointer.exists():
            return None
        path = self.dir / pointer.read_text().strip()
        return path if (path / "state.json").exists() else None

    def save(self, engine: PolicyEngine, step: int, state: dict) -> Path:
        """Collective: every rank calls it (DeepSpeed saves its shard); rank 0 writes the rest."""
        import torch.distributed as dist

        tag = f"step{step:06d}"
        tmp, final = self.dir / f".tmp-{tag}", self.dir / tag
        if engine.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        engine.save_checkpoint(str(tmp), "ds", client_state={})
        dist.barrier()
        if FAULT_PAUSE_S:  # fault injection for the kill-during-save tests: widen the window
            time.sleep(FAULT_PAUSE_S)
        if engine.rank == 0:
            torch.save(rng_state(), tmp / "rng.pt")
            (tmp / "state.json").write_text(json.dumps(state))
            _fsync_tree(tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            pointer_tmp = self.dir / ".latest.tmp"
            pointer_tmp.write_text(tag)
            os.replace(pointer_tmp, self.dir / "latest")
            self._prune(keep_tag=tag)
        dist.barrier()
        return final

    def load(self, engine: PolicyEngine, path: Path) -> dict:
        engine.load_checkpoint(str(path), "ds")
        set_rng_state(torch.load(path / "rng.pt", weights_only=False))
        return json.loads((path / "state.json").read_text())

    def _prune(self, keep_tag: str) -> None:
        tags = sorted(p.name for p in self.dir.glob("step*") if p.is_dir())
        for name in tags[:-self.keep]:
            if name != keep_tag:
                shutil.rmtree(self.dir / name, ignore_errors=True)
        for p in self.dir.glob(".tmp-*"):  # leftovers of a save that was killed
            shutil.rmtree(p, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
