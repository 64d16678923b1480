"""WebShop (text mode) on the offline 1,000-product pack: see ``env.py`` for the episode rules."""
from __future__ import annotations

from .env import WebshopEnv, parse_action

__all__ = ["WebshopEnv", "parse_action"]
