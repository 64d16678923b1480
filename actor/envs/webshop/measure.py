"""How much two reward choices move the score: the noun matcher, and values vs (name, value) options.

Run: ``python -m himac.actor.envs.webshop.measure [--goals N]`` (add ``textblob`` to the environment
to include a real part-of-speech tagger as a reference).

Method (noun matcher). Purchases: for each of the first N shuffled goals (default: the 500 test
goals), the goal's product plus the top 10 products that searching the goal's instruction returns -
the products an agent is likely to buy. Options: for every goal option, the candidate's option
value with the best fuzzy score if it is > 85, else none (what a careful agent would click). Each
purchase is scored with the fallback ("rules") and with each alternative matcher: "content" (all
content words: the fallback without its morphology filter) and, when installed, "brill" (TextBlob's
PatternTagger, a Brill-style lexicon + context-rule tagger; tokens tagged NN/NNS/NNP/NNPS). We count
purchases whose title score, r_type, score or ``won`` differ from the fallback's, and the mean
absolute score difference. The goal product itself always gets the same r_type under any tagger.

Method (options). For each of those goals with options and each value of its product's option
groups, a purchase of the goal product choosing the goal's values but that one value in its group:
option matches computed on values (ours) and as the original does for synthetic goals (the chosen
value against the text of the (name, value) tuple, ``normalize_color`` as tuple membership).
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from typing import Callable, Iterable

from himac.protocol.config import WebshopConfig

from .catalog import Catalog, load_catalog
from .data import Product, resolve_data_dir
from .goals import Goal
from .nouns import NounMatcher, cached, content_words, rule_nouns, tokens
from .reward import FUZZY_MATCH_THRESHOLD, option_matches, score_purchase, token_set_ratio

log = logging.getLogger(__name__)
CANDIDATES_PER_GOAL = 10


@dataclass
class Purchase:
    goal: Goal
    product: Product
    options: dict[str, str]


def likely_purchases(catalog: Catalog, goals: Iterable[Goal]) -> list[Purchase]:
    out = []
    for goal in goals:
        hits = catalog.search(goal.instruction.lower())[:CANDIDATES_PER_GOAL]
        asins = [goal.asin] + [a for a in hits if a != goal.asin]
        for asin in asins:
            product = catalog.by_asin[asin]
            chosen = {}
            for want in goal.options.values():
                best = max(
                    ((token_set_ratio(v, want), name, v) for name, values in product.options.items() for v in values),
                    default=(0, "", ""),
                )
                if best[0] > FUZZY_MATCH_THRESHOLD:
                    chosen[best[1]] = best[2]
            out.append(Purchase(goal, product, chosen))
    return out


def compare_matchers(
    catalog: Catalog, purchases: list[Purchase], base: NounMatcher, other: NounMatcher
) -> dict[str, float]:
    base_nouns, other_nouns = cached(base), cached(other)
    n = len(purchases)
    counts = dict(title_score=0, r_type=0, score=0, won=0)
    abs_diff = 0.0
    for p in purchases:
        price = catalog.prices[p.product.asin]
        a = score_purchase(p.product, p.options, price, p.goal, base_nouns)
        b = score_purchase(p.product, p.options, price, p.goal, other_nouns)
        counts["title_score"] += a.title_score != b.title_score
        counts["r_type"] += a.r_type != b.r_type
        counts["score"] += a.score != b.score
        counts["won"] += (a.score == 1.0) != (b.score == 1.0)
        abs_diff += abs(a.score - b.score)
    return {f"differ_{k}": v / n for k, v in counts.items()} | {"mean_abs_score_diff": abs_diff / n, "purchases": n}


def compare_option_semantics(catalog: Catalog, goals: Iterable[Goal]) -> dict[str, float]:
    exact_same = exact_total = alt_total = alt_differ = alt_more_lenient = 0
    for goal in goals:
        if not goal.options:
            continue
        exact_total += 1
        exact_same += option_matches(goal.options.values(), goal.options, as_pairs=True) == len(goal.options)
        product = catalog.by_asin[goal.asin]
        for name, values in product.options.items():
            for v in values:
                if v == goal.options[name]:
                    continue
                chosen = dict(goal.options) | {name: v}
                orig = option_matches(chosen.values(), goal.options, as_pairs=True)
                ours = option_matches(chosen.values(), goal.options)
                alt_total += 1
                alt_differ += orig != ours
                alt_more_lenient += ours > orig
    return {
        "goals_with_options": exact_total,
        "exact_choice_all_match_as_pairs": exact_same / max(exact_total, 1),
        "one_wrong_value_purchases": alt_total,
        "one_wrong_value_differ": alt_differ / max(alt_total, 1),
        "one_wrong_value_values_more_lenient": alt_more_lenient / max(alt_total, 1),
    }


def _brill_matcher() -> NounMatcher | None:
    try:
        from textblob.en.taggers import PatternTagger
    except ImportError:
        return None
    tagger = PatternTagger()

    def brill_nouns(title: str) -> list[str]:
        # tag our spaCy-like tokens, so only the part-of-speech decision differs
        tagged = tagger.tag(" ".join(tokens(title)), tokenize=False)
        return [w.lower() for w, tag in tagged if tag.startswith("NN") and len(w) >= 2 and any(c.isalpha() for c in w)]

    return brill_nouns


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--goals", type=int, default=500, help="first N shuffled goals (500 = the test split)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = WebshopConfig()
    catalog = load_catalog(resolve_data_dir(cfg.data_dir), cfg.price_seed)
    goals = catalog.goals[: args.goals]
    purchases = likely_purchases(catalog, goals)
    others: dict[str, Callable[[str], list[str]] | None] = {"content": content_words, "brill": _brill_matcher()}
    for name, matcher in others.items():
        if matcher is None:
            log.info("noun matcher %s: not installed, skipped", name)
            continue
        log.info("rules vs %s: %s", name, compare_matchers(catalog, purchases, rule_nouns, matcher))
    if others["brill"] is not None:
        log.info("content vs brill: %s", compare_matchers(catalog, purchases, content_words, others["brill"]))
    log.info("options, values vs (name, value) tuples: %s", compare_option_semantics(catalog, goals))


if __name__ == "__main__":
    main()
