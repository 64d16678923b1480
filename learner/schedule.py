"""Co-evolution schedule: which level learns at each learner step (a pure function).

HiMAC alternates fixed-length phases: ``micro`` (the executor learns on micro groups, the
planner is frozen) and ``macro`` (the planner learns on macro groups, the executor is frozen).
"Frozen" means loss-masked: both levels share one set of weights. GRPO and GiGPO have a single
``flat`` phase.
"""
from __future__ import annotations

from himac.protocol.config import AlgoConfig


def phase_at(step: int, algo: AlgoConfig) -> str:
    """The phase of the step that produces version ``step + 1`` (steps count from 0)."""
    if algo.name != "himac":
        return "flat"
    s = algo.himac.schedule
    lengths = {"micro": s.micro_steps, "macro": s.macro_steps}
    second = "macro" if s.first == "micro" else "micro"
    pos = step % (lengths[s.first] + lengths[second])
    return s.first if pos < lengths[s.first] else second
