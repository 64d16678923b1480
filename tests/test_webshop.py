"""WebShop text env on the real offline 1k pack (skipped, with the reason, where the pack is absent)."""
from __future__ import annotations

import importlib.util
import random
from dataclasses import replace

import msgspec
import pytest

from himac.actor.envs import make_env
from himac.actor.envs.webshop import WebshopEnv, parse_action
from himac.actor.envs.webshop.catalog import load_catalog
from himac.actor.envs.webshop.data import INSTRUCTIONS_FILE, PRODUCTS_FILE, Product, load_products, resolve_data_dir
from himac.actor.envs.webshop.goals import PRICE_STEPS, Goal, build_synthetic_goals, draw_purchase_prices
from himac.actor.envs.webshop.nouns import cached, rule_nouns, tokens
from himac.actor.envs.webshop.reward import (
    attribute_matches,
    normalize_color,
    option_matches,
    score_purchase,
    token_set_ratio,
    type_reward,
)
from himac.actor.envs.webshop.search import LuceneAnalyzer, _byte4_to_int, _int_to_byte4
from himac.protocol.config import ConfigError, EnvConfig, WebshopConfig, load_config

DATA_DIR = resolve_data_dir("")
HAVE_DATA = (DATA_DIR / PRODUCTS_FILE).is_file() and (DATA_DIR / INSTRUCTIONS_FILE).is_file()
needs_data = pytest.mark.skipif(
    not HAVE_DATA, reason=f"WebShop data pack not found at {DATA_DIR} (../shared/data/webshop, or $HIMAC_WEBSHOP_DATA)"
)
NOUNS = cached(rule_nouns)


@pytest.fixture(scope="module")
def env() -> WebshopEnv:
    return WebshopEnv(WebshopConfig())


@pytest.fixture(scope="module")
def catalog(env: WebshopEnv):
    return env.catalog


# --------------------------------------------------------------------------- goals and splits
@needs_data
def test_goal_count_splits_and_ids(env: WebshopEnv) -> None:
    assert len(env.catalog.goals) == 6910
    test, train = env.task_ids("test"), env.task_ids("train")
    assert (len(test), len(train)) == (500, 6410)
    assert test[0] == "webshop/test/0" and train[0] == "webshop/train/500" and train[-1] == "webshop/train/6909"
    assert env.splits() == ["train", "test"]
    with pytest.raises(ValueError):
        env.reset("webshop/train/3")  # a test goal under the train split
    with pytest.raises(ValueError):
        env.task_ids("valid")


@needs_data
def test_registry_and_spacy_option() -> None:
    env = make_env(EnvConfig(name="webshop"))
    assert isinstance(env, WebshopEnv) and env.max_steps == 15
    if importlib.util.find_spec("en_core_web_sm") is None:
        with pytest.raises(RuntimeError, match="en_core_web_sm"):
            WebshopEnv(WebshopConfig(title_nouns="spacy"))


@needs_data
def test_shuffle_is_the_text_envs_and_deterministic(catalog) -> None:
    products = load_products(DATA_DIR)
    rng = random.Random(233)
    unshuffled = build_synthetic_goals(products, draw_purchase_prices(products, rng), rng)
    order = list(range(len(unshuffled)))
    random.seed(233)  # exactly what SimServer does to the global RNG
    random.shuffle(order)
    assert [unshuffled[i] for i in order] == catalog.goals
    assert catalog.goals[0].instruction.startswith("Find me double sided, machine washable decorative pillows")


@needs_data
def test_price_bounds_follow_goal_py(catalog) -> None:
    for goal in catalog.goals[:300]:
        price = catalog.prices[goal.asin]
        above = [p for p in PRICE_STEPS if p > price][:4]
        if len(above) >= 2:
            assert goal.price_upper in above[1:]  # the larger of 2 drawn from the first 4
            assert goal.instruction.endswith(f", and price lower than {goal.price_upper:.2f} dollars")
        else:
            assert goal.price_upper == 1_000_000 and "price lower than" not in goal.instruction
    ranged = [p for p in catalog.products if len(p.pricing) == 2]
    # some ranges are written high to low; uniform() takes either order
    assert ranged and all(min(p.pricing) <= catalog.prices[p.asin] <= max(p.pricing) for p in ranged)
    other_seed = load_catalog(DATA_DIR, 7)  # the seed moves the draws, not the goal order
    assert [g.asin for g in other_seed.goals] == [g.asin for g in catalog.goals]
    assert [g.price_upper for g in other_seed.goals] != [g.price_upper for g in catalog.goals]


# --------------------------------------------------------------------------- reward on real goals
@needs_data
def test_every_goal_is_won_by_its_own_product_and_options(catalog) -> None:
    for goal in catalog.goals:
        s = score_purchase(catalog.by_asin[goal.asin], goal.options, catalog.prices[goal.asin], goal, NOUNS)
        assert s.score == 1.0, goal


@needs_data
def test_reward_wrong_option_other_product_and_price(catalog) -> None:
    goal = catalog.goals[1]  # color black, size 3x-large
    product, price = catalog.by_asin[goal.asin], catalog.prices[goal.asin]
    exact = score_purchase(product, goal.options, price, goal, NOUNS)
    assert exact.score == 1.0 and exact.r_option == 1.0 and exact.r_type == 1.0
    wrong_size = dict(goal.options, size="small")
    assert score_purchase(product, wrong_size, price, goal, NOUNS).score < 1.0
    assert score_purchase(product, {}, price, goal, NOUNS).r_option == 0.0
    other = next(p for p in catalog.products if p.category != goal.category)
    assert score_purchase(other, {}, catalog.prices[other.asin], goal, NOUNS).score < exact.score
    over = score_purchase(product, goal.options, goal.price_upper + 0.01, goal, NOUNS)
    assert over.r_price == 0.0 and over.score < 1.0
    assert score_purchase(product, goal.options, goal.price_upper, goal, NOUNS).r_price == 1.0  # <= bound


@needs_data
def test_options_as_pairs_reproduces_the_original_quirk(catalog) -> None:
    goal = next(g for g in catalog.goals if g.options.get("color") == "fashion black girl")
    product, price = catalog.by_asin[goal.asin], catalog.prices[goal.asin]
    assert score_purchase(product, goal.options, price, goal, NOUNS).score == 1.0
    assert score_purchase(product, goal.options, price, goal, NOUNS, options_as_pairs=True).score < 1.0
    unwinnable = [
        g
        for g in catalog.goals
        if g.options and option_matches(g.options.values(), g.options, as_pairs=True) < len(g.options)
    ]
    assert len(unwinnable) == 458


# --------------------------------------------------------------------------- episodes
def _buy_goal_via_pages(env: WebshopEnv, task_id: str):
    obs = env.reset(task_id)
    goal = env.goal_of(task_id)
    assert obs.text == "'Search'" and obs.admissible == ["search[<your query>]"]
    r = env.step(f"search[{env.instruction()}]")
    assert not r.invalid and f"click[{goal.asin.lower()}]" in r.observation.admissible
    assert r.observation.admissible[:2] == ["click[back to search]", "click[next >]"]
    r = env.step(f"click[{goal.asin.lower()}]")
    assert not r.invalid and goal.asin not in r.observation.text and "'Buy Now'" in r.observation.text
    for value in goal.options.values():
        r = env.step(f"click[{value}]")
        assert not r.invalid and not r.done
    return env.step("click[Buy Now]")


@needs_data
def test_full_episode_buys_the_goal(env: WebshopEnv) -> None:
    r = _buy_goal_via_pages(env, "webshop/test/1")
    assert r.done and r.won and not r.invalid
    assert r.reward == 10.0 and r.info["score"] == 1.0 and r.info["asin"] == r.info["goal_asin"]
    assert r.observation.admissible == []
    assert env.task_type() == "fashion"
    with pytest.raises(RuntimeError):
        env.step("click[buy now]")


@needs_data
def test_wrong_option_scores_below_one_and_win_shape(env: WebshopEnv) -> None:
    env.reset("webshop/test/1")
    goal = env.goal_of("webshop/test/1")
    env.step(f"search[{goal.instruction}]")
    env.step(f"click[{goal.asin}]")  # upper case works: arguments are lower-cased
    env.step("click[black]")
    r = env.step("click[buy now]")
    assert r.done and not r.won and 0 < r.info["score"] < 1 and r.reward == pytest.approx(10 * r.info["score"])
    win_only = WebshopEnv(WebshopConfig(reward_shape="win"))
    win_only.reset("webshop/test/1")
    win_only.step(f"search[{goal.instruction}]")
    win_only.step(f"click[{goal.asin}]")
    assert win_only.step("click[buy now]").reward == 0.0
    assert _buy_goal_via_pages(win_only, "webshop/test/1").reward == 10.0


@needs_data
def test_invalid_actions_are_noops(env: WebshopEnv) -> None:
    env.reset("webshop/test/0")
    key = env.state_key()
    bad_actions = ["buy it", "search[]", "click[search]", "click[b00nothere]", "jump[b0743jkhbv]", "click[buy now]"]
    for bad in bad_actions:
        r = env.step(bad)
        assert r.invalid and not r.done and r.reward == 0.0 and env.state_key() == key, bad
    r = env.step("search[pillow]")
    assert not r.invalid and env.state_key() != key
    assert env.step("search[cushion]").invalid  # no search box on the results page
    anywhere = WebshopEnv(WebshopConfig(search_anywhere=True))
    anywhere.reset("webshop/test/0")
    anywhere.step("search[pillow]")
    assert not anywhere.step("search[cushion]").invalid


@needs_data
def test_navigation_pages_and_state_keys(env: WebshopEnv) -> None:
    env.reset("webshop/test/0")
    start = env.state_key()
    r = env.step("search[women]")
    page1 = env.state_key()
    assert "'Page 1 (Total results: 50)'" in r.observation.text
    r = env.step("click[next >]")
    assert "'Page 2 (Total results: 50)'" in r.observation.text and "click[< prev]" in r.observation.admissible
    r = env.step("click[< prev]")
    assert env.state_key() == page1
    asin = r.observation.admissible[2][len("click[") : -1]
    env.step(f"click[{asin}]")
    item = env.state_key()
    r = env.step("click[features]")
    assert r.observation.admissible == ["click[back to search]", "click[< prev]"]
    assert env.state_key() not in (item, page1)
    env.step("click[< prev]")
    assert env.state_key() == item
    env.step("click[< prev]")
    assert env.state_key() == page1
    env.step("click[back to search]")
    assert env.state_key() == start
    env.reset("webshop/test/2")
    assert env.state_key() != start  # the key names the task too


@needs_data
def test_step_cap_ends_the_episode(env: WebshopEnv) -> None:
    env.reset("webshop/train/600")
    for i in range(env.max_steps):
        r = env.step("click[nothing]")
        assert r.done == (i == env.max_steps - 1)
    assert not r.won and r.reward == 0.0 and r.info == {"score": 0.0, "timeout": True}


# --------------------------------------------------------------------------- helpers on small cases
def test_parse_action() -> None:
    assert parse_action(" Click[Buy Now] ") == ("click", "buy now")
    assert parse_action("search[ red shoes ]") == ("search", "red shoes")
    assert parse_action("click buy now") is None and parse_action("click[x] then more") is None


def test_token_set_ratio_like_thefuzz() -> None:
    assert token_set_ratio("fuzzy was a bear", "fuzzy fuzzy was a bear") == 100
    assert token_set_ratio("X-Large", "large") == 100  # punctuation -> space, token subset
    assert token_set_ratio("", "anything") == 0 and token_set_ratio("!!", "a") == 0
    assert token_set_ratio("x-large", "('size', 'large')") == 83  # the original's tuple text
    assert token_set_ratio("café", "caf") == 100  # force_ascii drops latin-1 letters


def make_product(title: str, query: str = "q", crumbs: str = "A › B", **fields) -> Product:
    base = dict(
        asin="B000000001", title=title, description="", bullet_points=("",), price_text="$1.0", pricing=(1.0,),
        rating="N.A.", category="c", query=query, product_category=crumbs, options={}, attributes=(),
        instruction=None, instruction_attributes=(),
    )
    return Product(**(base | fields))


def test_attribute_fuzzy_match_and_text_fallback() -> None:
    p = make_product(
        "Gentle Shampoo", description="Made with tea tree oil.", bullet_points=("Paraben-free",),
        attributes=("sulfate free", "natural ingredients"),
    )
    assert attribute_matches(p, ["sulfate-free"]) == 1  # fuzzy: token sets equal
    assert attribute_matches(p, ["natural ingredient"]) == 1  # 97 > 85
    assert attribute_matches(p, ["tea tree"]) == 1  # not an attribute, but in the description
    assert attribute_matches(p, ["paraben free"]) == 0  # bullet text says "paraben-free"
    assert attribute_matches(p, ["long lasting", "sulfate free"]) == 1


def test_normalize_color_substring_semantics() -> None:
    assert normalize_color("light blue") == "blue"  # first COLOR_SET word wins: blue < light
    assert normalize_color("fashion black girl") == "ash"  # substring of "fashion"
    assert normalize_color("3x-large") == "3x-large"
    assert option_matches(["navy blue"], {"color": "light blue"}) == 1  # both normalise to blue
    assert option_matches(["x-large"], {"size": "large"}) == 1  # token subset
    assert option_matches(["x-large"], {"size": "large"}, as_pairs=True) == 0
    assert option_matches([], {"size": "large"}) == 0


def test_title_nouns_and_type_reward_edges() -> None:
    assert tokens("Men's T-Shirt, 2.4Ghz") == ["Men", "T", "-", "Shirt", ",", "2.4Ghz"]
    nouns = rule_nouns("The Soft Padded Chair for Kids, 2 Pack, padded and washed")
    assert nouns == ["soft", "padded", "chair", "kids", "pack"]  # capitalised "Padded" kept, lower-case dropped
    product = make_product
    goal = Goal("B1", "", ("x",), {}, 10.0, "c", "q", "Cotton Shirt Shirt", "A › B")
    assert type_reward(product("Cotton Shirt"), goal, NOUNS).title_score == pytest.approx(2 / 3)  # repeats count
    assert type_reward(product("Wool Hat", "other", "C › D"), goal, NOUNS).r_type == 0.0  # no shared noun
    assert type_reward(product("Wool Shirt", "other", "C › D"), goal, NOUNS).r_type == 1.0  # 1/3 > 0.2
    assert type_reward(product("Wool Hat"), goal, NOUNS).r_type == 0.0  # query match does not save a 0 title score
    no_nouns = replace(goal, name="for the and")
    t = type_reward(product("Wool Hat", "other", "C › D"), no_nouns, NOUNS)
    assert t.title_score == 0.2 and t.r_type == 0.5  # no goal nouns: 0.2, not > 0.2, no match -> 0.5
    long_goal = replace(goal, name=" ".join(f"Noun{c}" for c in "abcdefghijk"))  # 11 nouns
    assert type_reward(product("Nouna"), long_goal, NOUNS).r_type == 0.1  # 1/11 < 0.1


def test_lucene_norms_and_analyzer() -> None:
    lengths = (0, 5, 23, 24, 31, 40, 100, 1000)
    assert [_byte4_to_int(_int_to_byte4(n)) for n in lengths] == [0, 5, 23, 24, 31, 40, 96, 984]
    analyze = LuceneAnalyzer()
    assert analyze("Women's 3.5oz Anti-Aging Creams, for the FACE") == ["women", "3.5oz", "anti", "ag", "cream", "face"]
    assert analyze("MEN'S U.S.A. 1,000-pack") == ["men", "u.s.a", "1,000", "pack"]


def test_config_fields_validate() -> None:
    cfg = load_config(overrides={"env.webshop.options_as_pairs": True, "env.webshop.title_nouns": "rules"})
    assert cfg.env.webshop.options_as_pairs and cfg.env.webshop.price_seed == 233
    with pytest.raises(ConfigError):
        load_config(overrides={"env.webshop.title_nouns": "nltk"})
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"reward_shape": "dense"}, WebshopConfig)
