"""A scripted generation backend for rollout tests: a real tokenizer, a fixed script instead of a model."""
from __future__ import annotations

from himac.actor.backend import Generation, GenerationBackend
from himac.actor.envs.pool import EnvPool
from himac.actor.envs.sokoban import SokobanEnv, solve
from himac.actor.rollout import EnvInfo, Rollout
from himac.protocol.config import load_config

TASK = "sokoban/6x6b1d30/test/7"


class ScriptedBackend(GenerationBackend):
    """Answers each prompt with ``script(prompt_text, call_index)``, tokenised by a real tokenizer."""

    name = "scripted"

    def __init__(self, tokenizer, script):
        super().__init__()
        self._tok, self.script, self.prompts = tokenizer, script, []

    @property
    def tokenizer(self):
        return self._tok

    def generate(self, prompts, params):
        out = []
        for ids in prompts:
            text = self._tok.decode(ids)
            self.prompts.append(text)
            reply = self.script(text, len(self.prompts) - 1)
            toks = self._tok.encode(reply, add_special_tokens=False)
            out.append(Generation(toks, [-0.5] * len(toks), reply, "stop"))
        return out

    def load_weights(self, update):
        self.version = update.version

    def weights_digest(self):
        return ""


def solution() -> list[str]:
    env = SokobanEnv()
    env.reset(TASK)
    return solve(env.current_room())


def make_rollout(tokenizer, script, budget=0, plan_failure_reward=None):
    cfg = load_config()
    backend = ScriptedBackend(tokenizer, script)
    info = EnvInfo(SokobanEnv.role, SokobanEnv.guide, 15, SokobanEnv.failure_return(15), SokobanEnv.step_cost)
    pool = EnvPool(cfg.env, 4, workers=0)
    return Rollout(backend, pool, info, cfg.rollout, max_subgoals=4, subgoal_budget_steps=budget,
                   plan_failure_reward=plan_failure_reward), backend
