"""What every bench prints about the machine it ran on (figures are only comparable on one machine)."""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path


def machine_facts() -> dict:
    cpu, mem_gib = "", None
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
        with open("/proc/meminfo") as f:
            kib = next((int(ln.split()[1]) for ln in f if ln.startswith("MemTotal")), 0)
            mem_gib = round(kib / 2**20, 1) if kib else None
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": cpu or platform.processor(), "mem_gib": mem_gib,
            "python": platform.python_version(), "loadavg": os.getloadavg()}


def write_json(path: str, figures: dict) -> None:
    """`--json FILE` of every bench: the raw figures, anything not JSON-native as its str()."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(figures, indent=1, default=str))
