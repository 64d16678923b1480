"""Synthetic goals, built as WebShop's ``engine/goal.py`` does with ``human_goals=False``.

One goal per (product with an instruction) x (combination of its option values, option names
sorted): 6,910 goals on the 1k pack. The text env then shuffles them with ``random.seed(233)``;
verl-agent and most RL setups hold out the first 500 shuffled goals for evaluation.

Randomness. The original draws two things from Python's *unseeded* global RNG, so they change with
every process (and differ between verl-agent's workers): the purchase price of a range-priced
product (``generate_product_prices``: uniform between the two bounds) and each goal's price bound
(``random.sample`` of 2 of the first 4 multiples of 10 above the price, keep the larger). We make
the same calls in the same order (all prices in product order, then one bound per instructed
product in product order) on ``random.Random(price_seed)``. The goal *order* does not depend on
these draws: the shuffle only sees the goal count, so our split equals the original's.
"""
from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

from .data import Product

PRICE_STEPS = [10.0 * i for i in range(1, 100)]  # 10 ... 990, as goal.py's PRICE_RANGE
NO_PRICE_BOUND = 1_000_000.0
GOAL_SHUFFLE_SEED = 233  # web_agent_text_env.SimServer: random.seed(233); random.shuffle(goals)


@dataclass(frozen=True)
class Goal:
    asin: str  # the product the instruction was written for
    instruction: str  # "Find me ... with color: black, and size: large, and price lower than 50.00 dollars"
    attributes: tuple[str, ...]  # instruction_attributes
    options: dict[str, str]  # option name -> value to pick
    price_upper: float
    category: str
    query: str
    name: str  # the goal product's title (title-noun score)
    product_category: str


def draw_purchase_prices(products: list[Product], rng: random.Random) -> dict[str, float]:
    """``generate_product_prices``: the single price, or a uniform draw inside a price range."""
    prices = {}
    for p in products:
        prices[p.asin] = p.pricing[0] if len(p.pricing) == 1 else rng.uniform(*p.pricing[:2])
    return prices


def draw_price_upper(price: float, rng: random.Random) -> tuple[float, str]:
    """Goal price bound and its instruction suffix (none when fewer than 2 steps lie above)."""
    candidates = [p for p in PRICE_STEPS if p > price][:4]
    if len(candidates) < 2:
        return NO_PRICE_BOUND, ""
    _, upper = sorted(rng.sample(candidates, 2))
    return upper, f", and price lower than {upper:.2f} dollars"


def build_synthetic_goals(products: list[Product], prices: dict[str, float], rng: random.Random) -> list[Goal]:
    """Goals in the original (unshuffled) order."""
    goals = []
    for p in products:
        if p.instruction is None:
            continue
        assert p.instruction_attributes, f"{p.asin}: instruction without attributes"
        price_upper, price_text = draw_price_upper(prices[p.asin], rng)
        names = sorted(p.options)
        for values in itertools.product(*(p.options[name] for name in names)):
            options = dict(zip(names, values, strict=True))
            option_text = ", and ".join(f"{k}: {v}" for k, v in options.items())
            option_text = f" with {option_text}" if option_text else ""
            goals.append(
                Goal(
                    asin=p.asin,
                    instruction=f"{p.instruction}{option_text}{price_text}",
                    attributes=p.instruction_attributes,
                    options=options,
                    price_upper=price_upper,
                    category=p.category,
                    query=p.query,
                    name=p.title,
                    product_category=p.product_category,
                )
            )
    return goals


def shuffled(goals: list[Goal]) -> list[Goal]:
    """The text env's fixed shuffle (same permutation as ``random.seed(233); random.shuffle``)."""
    out = list(goals)
    random.Random(GOAL_SHUFFLE_SEED).shuffle(out)
    return out
