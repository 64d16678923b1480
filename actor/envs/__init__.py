"""Environments: Sokoban (numpy), ALFWorld (the `alfworld` package), WebShop (text mode)."""
from __future__ import annotations

from himac.protocol.config import EnvConfig

from .base import Env, Observation, StepResult

ENV_NAMES = ("sokoban", "alfworld", "webshop")


def env_class(name: str) -> type[Env]:
    """The class of an environment, for its class-level facts (role, guide), without building one."""
    if name == "sokoban":
        from .sokoban import SokobanEnv

        return SokobanEnv
    if name == "alfworld":
        from .alfworld import AlfworldEnv

        return AlfworldEnv
    if name == "webshop":
        from .webshop import WebshopEnv

        return WebshopEnv
    raise ValueError(f"env.name: unknown environment {name!r}; choose one of {ENV_NAMES}")


def env_section(cfg: EnvConfig):
    """The config section of the chosen environment (it holds max_steps and the env's own fields)."""
    return getattr(cfg, cfg.name)


def make_env(cfg: EnvConfig) -> Env:
    """Build the environment named by ``cfg.name``; heavy packages import only when chosen."""
    env = env_class(cfg.name)(env_section(cfg))
    if cfg.reset_latency_s or cfg.step_latency_s:
        from .base import SlowEnv

        env = SlowEnv(env, cfg.reset_latency_s, cfg.step_latency_s)
    return env


__all__ = ["Env", "Observation", "StepResult", "make_env", "env_class", "env_section", "ENV_NAMES"]
