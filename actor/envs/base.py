"""The one interface every environment implements.

An environment is text in, text out. A *task id* names the exact game
(``sokoban/6x6b1/train/123``, ``alfworld/valid_unseen/<game dir>``, ``webshop/train/42``) so a
group of episodes can replay the same task. Invalid-action penalties are *not* added here: the
rollout adds ``rollout.invalid_action_penalty`` uniformly for every env; the env only says
whether the action was invalid (unparseable text never reaches the env at all).
"""
from __future__ import annotations

import abc
import random
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence


@dataclass
class Observation:
    text: str  # what the agent sees now
    admissible: list[str] | None = None  # admissible actions; None where the env has no list


@dataclass
class StepResult:
    observation: Observation
    reward: float  # environment reward of this step, without any invalid-action penalty
    done: bool
    won: bool
    invalid: bool = False  # the action was not admissible: a no-op, state unchanged
    info: dict[str, Any] = field(default_factory=dict)


class Env(abc.ABC):
    name: ClassVar[str]
    # verl-agent style role line that opens every prompt
    role: ClassVar[str] = "You are an expert agent."
    # extra guidance for the acting model (symbols, rules); may be empty
    guide: ClassVar[str] = ""
    # what one step costs in this env's reward (Sokoban: 0.1): a turn that never reaches the env
    # (<sub_done>, unparseable text) is charged it too, so skipping the env is never cheaper than acting
    step_cost: ClassVar[float] = 0.0
    max_steps: int

    @abc.abstractmethod
    def splits(self) -> list[str]: ...

    @abc.abstractmethod
    def task_ids(self, split: str) -> Sequence[str]:
        """All task ids of a finite split (may be lazily generated, e.g. seeded Sokoban)."""

    def sample_task(self, split: str, rng: random.Random) -> str:
        ids = self.task_ids(split)
        return ids[rng.randrange(len(ids))]

    @abc.abstractmethod
    def reset(self, task_id: str) -> Observation: ...

    @abc.abstractmethod
    def step(self, action: str) -> StepResult: ...

    @abc.abstractmethod
    def instruction(self) -> str:
        """The task in words, as the planner and executor see it."""

    @abc.abstractmethod
    def task_type(self) -> str:
        """Category for per-type success tables (ALFWorld's six types, WebShop category, ...)."""

    @abc.abstractmethod
    def state_key(self) -> str:
        """Identity of the exact environment state (GiGPO anchor states): equal iff same state."""

    @classmethod
    def failure_return(cls, max_steps: int) -> float:
        """Return of an episode that runs out of steps without progress (a failed plan earns this)."""
        return 0.0

    def close(self) -> None:
        pass


class SlowEnv(Env):
    """An env with a fixed latency added to every reset and step (benchmarks: the cost of slow envs)."""

    def __init__(self, env: Env, reset_latency_s: float, step_latency_s: float):
        self.env, self.reset_latency_s, self.step_latency_s = env, reset_latency_s, step_latency_s
        self.name, self.role, self.guide = env.name, env.role, env.guide
        self.step_cost, self.max_steps = env.step_cost, env.max_steps

    def splits(self) -> list[str]:
        return self.env.splits()

    def task_ids(self, split: str) -> Sequence[str]:
        return self.env.task_ids(split)

    def sample_task(self, split: str, rng: random.Random) -> str:
        return self.env.sample_task(split, rng)

    def reset(self, task_id: str) -> Observation:
        time.sleep(self.reset_latency_s)
        return self.env.reset(task_id)

    def step(self, action: str) -> StepResult:
        time.sleep(self.step_latency_s)
        return self.env.step(action)

    def instruction(self) -> str:
        return self.env.instruction()

    def task_type(self) -> str:
        return self.env.task_type()

    def state_key(self) -> str:
        return self.env.state_key()

    def close(self) -> None:
        self.env.close()
