"""The purchase score, as WebShop's ``engine/goal.py:get_reward`` computes it.

score = r_type * (attributes matched + options matched + r_price) / (|attributes| + |options| + 1)

* r_type from the query match, the category match (>= 2 shared breadcrumb segments) and the title
  score (share of the goal title's nouns found among the bought title's nouns; see ``nouns.py``);
* an attribute matches if some product attribute has a thefuzz ``token_set_ratio`` > 85 with it,
  or failing that it occurs in the lower-cased title, joined bullet points or description;
* an option matches if some chosen option value has ``token_set_ratio`` > 85 with it, after
  ``normalize_color`` on both sides;
* r_price = 1 iff the purchase price <= the goal's price bound.

Deviation: for synthetic goals (a dict of options) the original passes ``goal_options.items()``,
i.e. (name, value) *tuples*, to the option matcher: ``normalize_color`` then tests tuple membership
(only a value that *is* a colour word gets normalised) and thefuzz compares the chosen value with
the tuple's text, "('size', 'large')" -> "size large". So the option name joins the goal's tokens:
choosing "x-large" for goal size "large" scores 83 (no match) there, 100 (match) on values. We
compare option *values* with values, as the original's human-goal path does; ``measure.py``
counts how often the two disagree. Worse, the quirk makes 458 of the 6,910 goals unwinnable even
with the exact goal options chosen (e.g. "fashion black girl" normalises to "ash" on the chosen
side only). ``options_as_pairs=True`` (config) reproduces the original for like-for-like numbers.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

from rapidfuzz import fuzz

from .data import Product
from .goals import Goal

FUZZY_MATCH_THRESHOLD = 85  # strictly greater matches

# web_agent_site/engine/normalize.py COLOR_SET, in its order (the first contained word wins)
COLOR_SET = (
    "alabaster apricot aqua ash asphalt azure banana beige black blue blush bordeaux bronze brown burgundy "
    "camel camo caramel champagne charcoal cheetah chestnut chocolate christmas coffee cognac copper coral "
    "cranberry cream crystal dark denim eggplant elephant espresso fuchsia gold granite grape graphite grass "
    "gray green grey heather indigo ivory ivy khaki lavender lemon leopard light lilac lime magenta maroon "
    "mauve merlot midnight mint mocha multicolor mushroom mustard natural navy nude olive orange peach pewter "
    "pink plum purple rainbow red rose royal rust sand sapphire seashell silver skull slate steel stone "
    "stonewash sunflower tan taupe teal tiger turquoise violet walnut wheat white wine yellow"
).split()

# thefuzz utils.full_process(force_ascii=True): drop chars 128-255, non-alphanumerics -> space,
# lower-case, strip
_DROP_LATIN1 = {c: None for c in range(128, 256)}
_NON_WORD_RE = re.compile(r"(?ui)\W")


def thefuzz_process(s: str) -> str:
    return _NON_WORD_RE.sub(" ", s.translate(_DROP_LATIN1)).lower().strip()


def token_set_ratio(a: str, b: str) -> int:
    """thefuzz ``fuzz.token_set_ratio`` (0-100, rounded as thefuzz does) on rapidfuzz.

    WebShop pins thefuzz 0.19, whose ratio is difflib's (or python-Levenshtein's, = rapidfuzz's)
    matching ratio; on the 21,944 attribute/option pairs of the likely purchases in ``measure.py``
    the > 85 decision of a difflib version never differed from this one.
    """
    pa, pb = thefuzz_process(a), thefuzz_process(b)
    if not pa or not pb:
        return 0
    return int(round(fuzz.token_set_ratio(pa, pb, processor=None)))


def normalize_color(value: str) -> str:
    """The first COLOR_SET word contained in the value (substring test, as the original), else the value."""
    for color in COLOR_SET:
        if color in value:
            return color
    return value


@dataclass(frozen=True)
class TypeMatch:
    r_type: float
    query_match: bool
    category_match: bool
    title_score: float


def type_reward(bought: Product, goal: Goal, nouns: Callable[[str], Iterable[str]]) -> TypeMatch:
    query_match = bought.query == goal.query
    bought_crumbs = {x.strip() for x in bought.product_category.split("›")}
    goal_crumbs = {x.strip() for x in goal.product_category.split("›")}
    category_match = len(bought_crumbs & goal_crumbs) >= 2

    bought_nouns = list(nouns(bought.title))
    goal_nouns = list(nouns(goal.name))
    # denominator counts repeated goal nouns, as the original's list length does
    title_score = len(set(bought_nouns) & set(goal_nouns)) / len(goal_nouns) if goal_nouns else 0.2

    r_type = 1.0
    if not (query_match or category_match or title_score > 0.2):
        r_type = 0.5
    if title_score < 0.1:
        r_type = 0.1
    if title_score == 0.0:
        r_type = 0.0
    return TypeMatch(r_type, query_match, category_match, title_score)


def attribute_matches(bought: Product, goal_attributes: Iterable[str]) -> int:
    title, desc = bought.title.lower(), bought.description.lower()
    bullets = " ".join(bought.bullet_points).lower()
    n = 0
    for g in goal_attributes:
        if any(token_set_ratio(p, g) > FUZZY_MATCH_THRESHOLD for p in bought.attributes):
            n += 1
        elif g in title or g in bullets or g in desc:
            n += 1
    return n


def _pair_as_original(pair: tuple[str, str]) -> str:
    """What the original compares for a synthetic goal's (name, value): ``normalize_color`` on a
    tuple is a membership test, and thefuzz turns the tuple into its ``str``."""
    for color in COLOR_SET:
        if color in pair:
            return color
    return str(pair)


def option_matches(chosen_values: Iterable[str], goal_options: Mapping[str, str], as_pairs: bool = False) -> int:
    """Goal options matched by some chosen value (values compared; ``as_pairs``: the original's quirk)."""
    chosen = [normalize_color(v) for v in chosen_values]
    if as_pairs:
        wanted = [_pair_as_original(pair) for pair in goal_options.items()]
    else:
        wanted = [normalize_color(v) for v in goal_options.values()]
    return sum(any(token_set_ratio(c, g) > FUZZY_MATCH_THRESHOLD for c in chosen) for g in wanted)


@dataclass(frozen=True)
class Score:
    score: float  # 0..1; 1 iff everything matches
    r_type: float
    r_att: float
    r_option: float | None  # None when the goal has no options
    r_price: float
    title_score: float
    query_match: bool
    category_match: bool

    def as_info(self) -> dict[str, float | bool | None]:
        return dict(self.__dict__)


def score_purchase(
    bought: Product,
    chosen_options: Mapping[str, str],
    price: float,
    goal: Goal,
    nouns: Callable[[str], Iterable[str]],
    options_as_pairs: bool = False,
) -> Score:
    """``get_reward`` for buying ``bought`` at ``price`` with the option values in ``chosen_options``."""
    t = type_reward(bought, goal, nouns)
    r_price = 1.0 if price <= goal.price_upper else 0.0
    n_att = attribute_matches(bought, goal.attributes)
    n_opt = option_matches(chosen_options.values(), goal.options, options_as_pairs)
    denominator = len(goal.attributes) + len(goal.options) + 1
    score = (n_att + n_opt + r_price) / denominator * t.r_type  # the original's operation order
    return Score(
        score=score,
        r_type=t.r_type,
        r_att=n_att / len(goal.attributes),
        r_option=n_opt / len(goal.options) if goal.options else None,
        r_price=r_price,
        title_score=t.title_score,
        query_match=t.query_match,
        category_match=t.category_match,
    )
