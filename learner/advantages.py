"""Critic-free advantages: pure functions on numbers, checked by hand in tests.

- ``group_advantages``: GRPO's group-relative normalisation, used for every group kind:
  macro (G blueprints of one task -> one advantage per blueprint, on its planner tokens),
  micro (N runs of one fixed blueprint -> one per run, on its executor tokens) and flat
  (N runs of one task, GRPO).
- ``anchor_step_advantages``: GiGPO's step-level advantage: steps taken from the *same*
  environment state (an anchor state) in different trajectories of the group form a group of
  their own, compared by their discounted return-to-go.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass
class GroupAdvantage:
    advantages: np.ndarray  # one per member
    degenerate: bool  # all returns equal (or a single member): zero advantage, no signal


def group_advantages(returns: Sequence[float], norm: str = "mean_std", eps: float = 1e-6) -> GroupAdvantage:
    """A_i = (R_i - mean R) / (std R + eps) (population std), or R_i - mean R for ``norm='mean'``.

    A group whose returns are all equal gives exactly zero advantages and is flagged degenerate
    instead of dividing 0 by eps.
    """
    r = np.asarray(returns, dtype=np.float64)
    if r.size == 0:
        return GroupAdvantage(np.zeros(0), True)
    if r.size == 1 or np.all(r == r[0]):
        return GroupAdvantage(np.zeros_like(r), True)
    centred = r - r.mean()
    if norm == "mean":
        return GroupAdvantage(centred, False)
    if norm != "mean_std":
        raise ValueError(f"unknown normalisation {norm!r}")
    return GroupAdvantage(centred / (r.std() + eps), False)


def discounted_returns(rewards: Sequence[float], gamma: float) -> np.ndarray:
    """G_t = r_t + gamma * G_{t+1}: the return-to-go of every step."""
    out = np.zeros(len(rewards), dtype=np.float64)
    acc = 0.0
    for t in range(len(rewards) - 1, -1, -1):
        acc = rewards[t] + gamma * acc
        out[t] = acc
    return out


@dataclass
class StepAdvantages:
    per_episode: list[np.ndarray]  # step advantages, one array per episode
    anchor_groups: int  # anchor states seen by more than one step
    degenerate_groups: int  # of those, how many had all-equal returns


def anchor_step_advantages(step_rewards: Sequence[Sequence[float]], step_states: Sequence[Sequence[int]],
                           gamma: float = 0.95, norm: str = "mean", eps: float = 1e-6) -> StepAdvantages:
    """GiGPO step advantages: group every step of every episode by the state it was taken from.

    Within each anchor group the discounted returns-to-go are normalised (``norm``); a state seen
    only once gets 0 (nothing to compare with). A state revisited inside one episode contributes
    each visit, as in verl-agent.
    """
    returns = [discounted_returns(r, gamma) for r in step_rewards]
    groups: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for e, states in enumerate(step_states):
        if len(states) != len(step_rewards[e]):
            raise ValueError(f"episode {e}: {len(states)} states for {len(step_rewards[e])} rewards")
        for t, s in enumerate(states):
            groups[int(s)].append((e, t))
    out = [np.zeros(len(r), dtype=np.float64) for r in step_rewards]
    multi = degenerate = 0
    for members in groups.values():
        if len(members) < 2:
            continue
        multi += 1
        g = group_advantages([returns[e][t] for e, t in members], norm, eps)
        degenerate += int(g.degenerate)
        for (e, t), a in zip(members, g.advantages):
            out[e][t] = a
    return StepAdvantages(out, multi, degenerate)
