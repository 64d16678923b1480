"""WebShop, text mode, on the offline 1,000-product pack.

An episode: the search page -> ``search[query]`` -> results (top 50, 10 a page) -> ``click[asin]``
-> item page (click options, read the description / features / reviews tabs) -> ``click[buy now]``
ends it with the purchase score (``reward.py``). Actions use WebShop's syntax and are matched
case-insensitively, as the original lower-cases the argument (verl-agent lower-cases the whole
action). An action the current page does not offer is invalid: a no-op that still uses a step.
After ``max_steps`` steps without a purchase the episode ends, not won.

Task ids are ``webshop/{split}/{goal_index}``, the index into the text env's shuffled goal list
(verl-agent's session index): ``test`` = the first ``eval_goals`` goals, ``train`` = the rest.
"""
from __future__ import annotations

import re
from typing import Any, Sequence

from himac.protocol.config import WebshopConfig

from ..base import Env, Observation, StepResult
from .catalog import Catalog, load_catalog
from .data import resolve_data_dir
from .goals import Goal
from .nouns import NOUN_MATCHERS, cached
from .pages import PageState, RenderedPage, render
from .reward import score_purchase

SPLITS = ("train", "test")
SEARCH_ACTION = "search[<your query>]"  # how verl-agent lists the search box
_ACTION_RE = re.compile(r"(\w+)\[(.*)\]", re.DOTALL)
_TASK_RE = re.compile(r"webshop/(train|test)/(\d+)")

# one cached noun tagger per kind and process (titles are tagged once)
_NOUNS = {name: cached(fn) for name, fn in NOUN_MATCHERS.items()}


def parse_action(action: str) -> tuple[str, str] | None:
    """``verb[arg]`` -> (verb, arg), both lower-cased and stripped; None if malformed."""
    m = _ACTION_RE.fullmatch(action.strip())
    if m is None:
        return None
    return m.group(1).lower(), m.group(2).strip().lower()


class WebshopEnv(Env):
    name = "webshop"
    role = "You are an expert autonomous agent operating in the WebShop e-commerce environment."
    guide = (
        "Choose the admissible action that best advances the shopping goal: search[<your query>] on the "
        "search page, click[<product id>] to open a result, click[<option>] for each option the task names, "
        "then click[buy now]."
    )

    def __init__(self, cfg: WebshopConfig | None = None) -> None:
        self.cfg = cfg or WebshopConfig()
        self.max_steps = self.cfg.max_steps
        self.catalog: Catalog = load_catalog(resolve_data_dir(self.cfg.data_dir), self.cfg.price_seed)
        n_goals = len(self.catalog.goals)
        if self.cfg.eval_goals >= n_goals:
            raise ValueError(f"webshop.eval_goals={self.cfg.eval_goals} leaves no train goals (of {n_goals})")
        self._nouns = _NOUNS[self.cfg.title_nouns]
        self._nouns(self.catalog.goals[0].name)  # fail now, not at the first purchase, if spaCy is missing
        self._split_ranges = {"test": range(0, self.cfg.eval_goals), "train": range(self.cfg.eval_goals, n_goals)}
        self._task_id = ""
        self._goal: Goal | None = None
        self._state = PageState("search")
        self._page: RenderedPage = render(self._state, self.catalog)
        self._steps = 0
        self._done = True

    # ------------------------------------------------------------------ tasks
    def splits(self) -> list[str]:
        return list(SPLITS)

    def task_ids(self, split: str) -> Sequence[str]:
        if split not in self._split_ranges:
            raise ValueError(f"webshop: unknown split {split!r}; choose one of {SPLITS}")
        return [f"webshop/{split}/{i}" for i in self._split_ranges[split]]

    def goal_of(self, task_id: str) -> Goal:
        m = _TASK_RE.fullmatch(task_id)
        if m is None or int(m.group(2)) not in self._split_ranges[m.group(1)]:
            first_train = self.cfg.eval_goals
            raise ValueError(f"webshop: bad task id {task_id!r} (webshop/test/0.. or webshop/train/{first_train}..)")
        return self.catalog.goals[int(m.group(2))]

    # ------------------------------------------------------------------ episode
    def reset(self, task_id: str) -> Observation:
        self._goal = self.goal_of(task_id)
        self._task_id = task_id
        self._steps = 0
        self._done = False
        self._go(PageState("search"))
        return self._observation()

    def step(self, action: str) -> StepResult:
        if self._done or self._goal is None:
            raise RuntimeError("webshop: episode is over (or never started); call reset()")
        self._steps += 1
        parsed = parse_action(action)
        verb, arg = parsed if parsed else ("", "")
        reward, won, bought, info = 0.0, False, False, {}
        invalid = True
        if verb == "search" and arg and (self._page.has_search_box or self.cfg.search_anywhere):
            self._go(PageState("results", query=arg))
            invalid = False
        elif verb == "click" and arg in self._page.clickables and arg != "search":
            bought = self._click(arg)
            invalid = False

        if bought:
            reward, won, info = self._buy()
        elif self._steps >= self.max_steps:
            self._done = True
            info = {"score": 0.0, "timeout": True}
        return StepResult(self._observation(), reward, self._done, won, invalid, info)

    def _click(self, text: str) -> bool:
        """Follow a clickable of the current page; True when it was the buy button."""
        target = self._page.clickables[text]
        s = self._state
        if target.kind == "product":
            self._go(PageState("item", s.query, s.page, target.value, s.options))
        elif target.kind == "option":
            self._go(s.with_option(target.option_name, target.value))
        elif text == "back to search":
            self._go(PageState("search"))
        elif text == "next >":
            self._go(PageState("results", s.query, s.page + 1))
        elif text == "< prev" and s.kind == "results":
            self._go(PageState("results", s.query, s.page - 1))
        elif text == "< prev" and s.kind == "item":  # back to the results page, options forgotten
            self._go(PageState("results", s.query, s.page))
        elif text == "< prev":  # tab -> its item page, options kept
            self._go(PageState("item", s.query, s.page, s.asin, s.options))
        elif text in ("description", "features", "reviews"):
            self._go(PageState("tab", s.query, s.page, s.asin, s.options, tab=text))
        elif text == "buy now":
            return True
        return False

    def _buy(self) -> tuple[float, bool, dict[str, Any]]:
        assert self._goal is not None
        s = self._state
        product = self.catalog.by_asin[s.asin]
        price = self.catalog.prices[s.asin]
        score = score_purchase(product, s.chosen_options, price, self._goal, self._nouns, self.cfg.options_as_pairs)
        won = score.score == 1.0
        if self.cfg.reward_shape == "win":
            reward = self.cfg.win_reward if won else 0.0
        else:
            reward = self.cfg.win_reward * score.score
        self._done = True
        self._go(PageState("done", s.query, s.page, s.asin, s.options), score=score.score)
        info = score.as_info() | {"asin": s.asin, "goal_asin": self._goal.asin, "options": s.chosen_options}
        return reward, won, info

    def _go(self, state: PageState, score: float | None = None) -> None:
        self._state = state
        self._page = render(state, self.catalog, score)

    def _observation(self) -> Observation:
        if self._done:
            return Observation(self._page.text, [])
        actions = [SEARCH_ACTION] if self._page.has_search_box else []
        actions += [f"click[{text}]" for text in self._page.clickables if text != "search"]
        return Observation(self._page.text, actions)

    # ------------------------------------------------------------------ task facts
    def instruction(self) -> str:
        return self._require_goal().instruction

    def task_type(self) -> str:
        return self._require_goal().category

    def state_key(self) -> str:
        return f"{self._task_id}|{self._state.key()}"

    def _require_goal(self) -> Goal:
        if self._goal is None:
            raise RuntimeError("webshop: call reset(task_id) first")
        return self._goal
