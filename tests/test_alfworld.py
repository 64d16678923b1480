"""ALFWorld env on real games: the small valid_unseen tarball (one test unpacks the full one).

Skipped only when the data folder (``../shared/data/alfworld`` or ``$HIMAC_ALFWORLD_DATA``) is
absent; without the `alfworld` package every test fails and says to install the extra.
"""
from __future__ import annotations

import importlib.util
import json
import multiprocessing as mp
from pathlib import Path

import pytest

from himac.actor.envs import alfworld_data as data
from himac.protocol.config import AlfworldConfig

DATA_DIR = data.resolve_data_dir()
if not DATA_DIR.is_dir():
    pytest.skip(f"ALFWorld data folder {DATA_DIR} is absent (set ${data.DATA_ENV_VAR})", allow_module_level=True)

from himac.actor.envs.alfworld import INVALID_FEEDBACK, AlfworldEnv  # noqa: E402

ALFWORLD_MISSING = importlib.util.find_spec("alfworld") is None
SIX_TYPES = set(data.TASK_TYPES.values())
WELCOME = "-= Welcome to TextWorld, ALFRED! =-"


@pytest.fixture(scope="module", autouse=True)  # module scope: runs before the env fixtures
def _require_alfworld() -> None:
    if ALFWORLD_MISSING:
        pytest.fail("the `alfworld` package is not installed: pip install -e '.[alfworld]' "
                    "(alfworld==0.4.2; CI installs this extra)", pytrace=False)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("alfworld-cache")


def make_env(cache: Path, **kw) -> AlfworldEnv:
    return AlfworldEnv(AlfworldConfig(data_dir=str(DATA_DIR), cache_dir=str(cache), **kw))


@pytest.fixture(scope="module")
def env(cache_dir: Path) -> AlfworldEnv:
    return make_env(cache_dir)


@pytest.fixture(scope="module")
def games(env: AlfworldEnv, cache_dir: Path) -> dict[str, str]:
    """valid_unseen game folder -> task type, straight from the index."""
    _, listed = data.split_games(env.data_dir, cache_dir, "valid_unseen")
    return dict(listed)


def walkthrough(env: AlfworldEnv, task_id: str) -> list[str]:
    _, game = task_id.split("/", 2)[1:]
    folder, _ = data.split_games(env.data_dir, env.cache_dir, "valid_unseen")
    return json.loads((folder / game / data.GAME_FILE).read_text())["walkthrough"]


def first_of_type(env: AlfworldEnv, games: dict[str, str], task_type: str) -> str:
    game = next(g for g, t in sorted(games.items()) if t == task_type)
    return f"alfworld/valid_unseen/{game}"


# --------------------------------------------------------------------------- tasks
def test_task_ids_and_types(env: AlfworldEnv, games: dict[str, str]) -> None:
    ids = env.task_ids("valid_unseen")
    assert len(ids) == 134 and list(ids) == sorted(set(ids))
    assert all(t.startswith("alfworld/valid_unseen/") for t in ids)
    assert set(games.values()) == SIX_TYPES  # every one of the six types occurs in valid_unseen
    for game, task_type in games.items():  # the folder name starts with ALFRED's type name
        assert data.TASK_TYPES[game.split("-", 1)[0]] == task_type
    assert env.splits() == ["train", "valid_seen", "valid_unseen"]


def test_bad_task_ids(env: AlfworldEnv) -> None:
    for bad in ("sokoban/6x6b1d30/train/1", "alfworld/test/x/y", "alfworld/valid_unseen/",
                "alfworld/valid_unseen/no-such-game/trial_T0"):
        with pytest.raises(ValueError):
            env.reset(bad)
    with pytest.raises(ValueError):
        env.task_ids("test")


# --------------------------------------------------------------------------- playing
@pytest.mark.parametrize("task_type", sorted(SIX_TYPES, reverse=True))  # look_at_... last: the next tests reuse it
def test_walkthrough_wins(env: AlfworldEnv, games: dict[str, str], task_type: str) -> None:
    task_id = first_of_type(env, games, task_type)
    obs = env.reset(task_id)
    assert obs.text.startswith(WELCOME) and f"Your task is to: {env.instruction()}" in obs.text
    assert env.task_type() == task_type
    actions = walkthrough(env, task_id)
    for i, action in enumerate(actions):
        assert action in obs.admissible
        res = env.step(action)
        last = i == len(actions) - 1
        assert not res.invalid and res.won == last and res.done == last
        assert res.reward == (10.0 if last else 0.0)
        obs = res.observation


def test_admissible_and_invalid_actions(env: AlfworldEnv, games: dict[str, str]) -> None:
    task_id = first_of_type(env, games, "look_at_obj_in_light")
    obs = env.reset(task_id)
    assert obs.admissible and {"look", "inventory"} <= set(obs.admissible)
    assert "help" not in obs.admissible  # as verl-agent
    look = env.step("look").observation.text
    key = env.state_key()
    take = walkthrough(env, task_id)[1]  # "take <obj> from <recep>": not admissible before going there
    for bad in (take, "help", "fly to the moon", "", "<action>look", "look look"):
        res = env.step(bad)
        assert res.invalid and not res.done and not res.won and res.reward == 0.0
        assert res.observation.text == INVALID_FEEDBACK and res.observation.admissible == obs.admissible
    assert env.step("look").observation.text == look and env.state_key() == key  # no-ops: state unchanged
    res = env.step("  LOOK ")  # case and spacing do not matter (verl-agent lower-cases actions)
    assert not res.invalid and res.observation.text == look


def test_step_cap_ends_episode(env: AlfworldEnv, games: dict[str, str]) -> None:
    assert env.max_steps == 50
    env.reset(first_of_type(env, games, "look_at_obj_in_light"))
    for i in range(1, 51):
        res = env.step("look" if i % 2 else "not an action")  # invalid steps count too
        assert res.done == (i == 50) and not res.won and res.reward == 0.0
    with pytest.raises(RuntimeError):
        env.step("look")


def test_same_task_same_start(cache_dir: Path, env: AlfworldEnv, games: dict[str, str]) -> None:
    task_id = first_of_type(env, games, "look_at_obj_in_light")
    first = env.reset(task_id)
    key = env.state_key()
    env.step(walkthrough(env, task_id)[0])
    again = env.reset(task_id)  # same env, game already loaded: reset only
    assert (again.text, again.admissible, env.state_key()) == (first.text, first.admissible, key)
    other = make_env(cache_dir)
    fresh = other.reset(task_id)  # another env loads the game itself
    assert (fresh.text, fresh.admissible, other.state_key()) == (first.text, first.admissible, key)
    other.close()


def test_state_key(env: AlfworldEnv, games: dict[str, str]) -> None:
    task_id = first_of_type(env, games, "look_at_obj_in_light")
    env.reset(task_id)
    go_a, go_b = walkthrough(env, task_id)[0], "go to bed 1"
    env.step(go_a)
    at_a = env.state_key()
    env.step(go_b)
    env.step(go_a)  # back at the same place, nothing else changed: the same anchor state
    assert env.state_key() == at_a
    env.step("nonsense")
    nothing_at_a = env.state_key()
    env.step(go_b)
    env.step("nonsense")  # same text "Nothing happens." elsewhere: a different state
    assert env.state_key() != nothing_at_a


def test_envs_in_one_process_are_independent(cache_dir: Path, games: dict[str, str]) -> None:
    """Several envs in one process (as in a pool worker), two of them on the same game, interleaved."""
    a, b, c = make_env(cache_dir), make_env(cache_dir), make_env(cache_dir)
    ta, tb = first_of_type(a, games, "pick_two_obj_and_place"), first_of_type(b, games, "pick_heat_then_place")
    plans = {a: walkthrough(a, ta), b: walkthrough(b, tb), c: walkthrough(c, ta)}
    for e, task_id in ((a, ta), (b, tb), (c, ta)):
        e.reset(task_id)
    assert not c.step(plans[c].pop(0)).invalid  # c starts, then waits while a plays the same game to the end
    results = {}
    for i in range(max(len(plans[a]), len(plans[b]))):
        for e in (a, b):
            if i < len(plans[e]):
                results[e] = e.step(plans[e][i])
                assert not results[e].invalid
    for action in plans[c]:  # c's game did not move on with a's
        results[c] = c.step(action)
        assert not results[c].invalid
    assert all(r.won and r.done for r in results.values())
    for e in (a, b, c):
        e.close()


def test_matches_alfredtwenv(env: AlfworldEnv, cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same text, admissible commands and win signal as alfworld's own AlfredTWEnv."""
    from alfworld.agents.environment.alfred_tw_env import AlfredTWEnv

    folder, _ = data.split_games(env.data_dir, cache_dir, "valid_unseen")
    monkeypatch.setenv("ALFWORLD_DATA", str(folder.parent.parent))
    config = {
        "dataset": {"eval_ood_data_path": "$ALFWORLD_DATA/json_2.1.1/valid_unseen", "num_eval_games": -1},
        "env": {"type": "AlfredTWEnv", "domain_randomization": False, "task_types": [1, 2, 3, 4, 5, 6],
                "expert_type": "handcoded", "goal_desc_human_anns_prob": 0.0},
        "general": {"training_method": "dagger"},
        "dagger": {"training": {"max_nb_steps_per_episode": 50}},
    }
    theirs = AlfredTWEnv(config, train_eval="eval_out_of_distribution").init_env(batch_size=1)
    theirs.seed(42)
    assert len(env.task_ids("valid_unseen")) == 134
    obs, infos = theirs.reset()  # one game: each costs ~3 s
    game_dir = Path(infos["extra.gamefile"][0]).parent
    mine = env.reset(f"alfworld/valid_unseen/{game_dir.relative_to(folder).as_posix()}")
    assert mine.text == obs[0]
    assert mine.admissible == [c for c in infos["admissible_commands"][0] if c != "help"]
    # a non-admissible command: the engine answers "Nothing happens." (ours does not even send it)
    plan = ["dance with the desklamp"] + json.loads((game_dir / data.GAME_FILE).read_text())["walkthrough"]
    for action in plan:
        obs, _, dones, infos = theirs.step([action])
        res = env.step(action)
        assert res.observation.text == obs[0] and res.won == infos["won"][0]
        assert res.observation.admissible == [c for c in infos["admissible_commands"][0] if c != "help"]
    assert res.won and dones[0]
    theirs.close()


# --------------------------------------------------------------------------- unpacking
def test_unpack_once(tmp_path: Path, games: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "fresh"  # does not exist yet
    first = make_env(cache)
    assert len(first.task_ids("valid_unseen")) == 134
    unpacked = cache / data.tarball_stem(DATA_DIR / data.SMALL_TARBALL)
    assert (unpacked / data.INDEX_FILE).is_file()
    assert not (cache / data.tarball_stem(DATA_DIR / data.FULL_TARBALL)).exists()  # the small one sufficed
    assert not list(cache.glob(".*.tmp-*"))

    def no_unpack(*_a, **_k):
        raise AssertionError("unpacked a second time")

    monkeypatch.setattr(data, "_extract", no_unpack)
    second = make_env(cache)
    assert list(second.task_ids("valid_unseen")) == list(first.task_ids("valid_unseen"))
    assert second.reset(first.task_ids("valid_unseen")[0]).text.startswith(WELCOME)
    second.close()


def test_outdated_cache_is_replaced(tmp_path: Path) -> None:
    small = DATA_DIR / data.SMALL_TARBALL
    folder, did = data.unpack_once(small, tmp_path)
    assert did and data.unpack_once(small, tmp_path) == (folder, False)
    meta = json.loads((folder / data.INDEX_FILE).read_text())
    meta["source_size"] += 1  # as if the tarball had changed since
    (folder / data.INDEX_FILE).write_text(json.dumps(meta))
    assert data.unpack_once(small, tmp_path) == (folder, True)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == [folder.name]


def test_concurrent_unpack(tmp_path: Path) -> None:
    """Processes starting together: exactly one unpacks, all get a complete folder."""
    with mp.get_context("spawn").Pool(3) as pool:
        results = pool.starmap(data.unpack_once, [(DATA_DIR / data.SMALL_TARBALL, tmp_path)] * 3)
    folder = tmp_path / data.tarball_stem(DATA_DIR / data.SMALL_TARBALL)
    assert sorted(did for _, did in results) == [False, False, True] and {f for f, _ in results} == {folder}
    assert len(json.loads((folder / data.INDEX_FILE).read_text())["splits"]["valid_unseen"]) == 134
    assert not list(tmp_path.glob(".*.tmp-*"))


def test_full_tarball_split_counts(tmp_path: Path) -> None:
    """The full tarball: AlfredTWEnv's counts (train 3553, eval in/out of distribution 140 / 134).

    Uses the default cache (as training does), so the 376 MB / 14k-file tree is unpacked once per
    machine, not per test run: pytest deleting it from its temp dirs costs tens of seconds.
    """
    env = AlfworldEnv(AlfworldConfig(data_dir=str(DATA_DIR)))
    small_ids = list(make_env(tmp_path).task_ids("valid_unseen"))
    assert len(env.task_ids("valid_seen")) == 140  # needs the full tarball: unpacks it if not there yet
    assert len(env.task_ids("train")) == 3553
    assert list(env.task_ids("valid_unseen")) == small_ids  # now served by the full copy, same ids
    assert (env.cache_dir / data.tarball_stem(DATA_DIR / data.FULL_TARBALL) / data.INDEX_FILE).is_file()
    obs = env.reset(env.task_ids("train")[0])
    assert obs.text.startswith(WELCOME) and env.task_type() in SIX_TYPES
    env.close()
