"""ALFWorld game files: find the offline tarballs, unpack one once into a cache, index its games.

The data folder (``../shared/data/alfworld`` beside the repo, see its SOURCE.md) holds
``alfworld_json_2.1.1.tar.xz`` (every split) and ``alfworld_valid_unseen.tar.xz`` (a cut with only
``valid_unseen``). A tarball is unpacked once per cache folder, atomically: into a temporary folder
next to the final one, then renamed, under a file lock, so any number of env processes may start
at once and each sees either no folder or a complete one. The game index (which games a split
holds, their task types) is written into the folder before the rename, so listing the 3553 train
games never reopens their files.

Which games count mirrors alfworld 0.4.2's ``AlfredTWEnv.collect_game_files``: a folder with
``traj_data.json``, no "movable"/"Sliced" in its path, one of the six task types, a
``game.tw-pddl`` marked ``solvable``.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Iterator

from himac.protocol.config import SHARED_DIR_DEFAULT

log = logging.getLogger(__name__)

SPLITS = ("train", "valid_seen", "valid_unseen")
FULL_TARBALL = "alfworld_json_2.1.1.tar.xz"  # every split
SMALL_TARBALL = "alfworld_valid_unseen.tar.xz"  # valid_unseen only: 0.2 MB, unpacks in ~0.1 s
TOP_DIR = "json_2.1.1"  # the one folder at the top of both tarballs
GAME_FILE = "game.tw-pddl"
INDEX_FILE = "himac_index.json"
DATA_ENV_VAR = "HIMAC_ALFWORLD_DATA"

# ALFRED's task-type names (traj_data.json) -> the short names our per-type tables use
TASK_TYPES = {
    "pick_and_place_simple": "pick_and_place",
    "look_at_obj_in_light": "look_at_obj_in_light",
    "pick_clean_then_place_in_recep": "pick_clean_then_place",
    "pick_heat_then_place_in_recep": "pick_heat_then_place",
    "pick_cool_then_place_in_recep": "pick_cool_then_place",
    "pick_two_obj_and_place": "pick_two_obj_and_place",
}

# split -> sorted [(game folder relative to the split folder, short task type)]
SplitIndex = dict[str, list[tuple[str, str]]]

_index_cache: dict[Path, SplitIndex] = {}  # unpacked folder -> its index, shared by the envs of a process


def resolve_data_dir(configured: str = "") -> Path:
    """``$HIMAC_ALFWORLD_DATA``, else the config's ``data_dir``, else ``<shared>/data/alfworld``."""
    return Path(os.environ.get(DATA_ENV_VAR) or configured or Path(SHARED_DIR_DEFAULT) / "data" / "alfworld")


def resolve_cache_dir(configured: str = "") -> Path:
    if configured:
        return Path(configured).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "himac" / "alfworld"


def tarball_stem(tarball: Path) -> str:
    return tarball.name.removesuffix(".tar.xz")


# --------------------------------------------------------------------------- unpack once
@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (flock) held for the block; released if the process dies."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _is_complete(unpacked: Path, tarball: Path) -> bool:
    """The folder exists (renamed into place only when complete) and came from this very tarball."""
    try:
        meta = json.loads((unpacked / INDEX_FILE).read_text())
    except (OSError, ValueError):
        return False
    # the size is a cheap guard against a cache left over from a different (updated) tarball
    return meta.get("source_size") == tarball.stat().st_size


def _extract(tarball: Path, dest: Path) -> None:
    with tarfile.open(tarball, "r:xz") as tar:
        for member in tar.getmembers():
            parts = Path(member.name).parts
            if not parts or parts[0] != TOP_DIR or ".." in parts or member.name.startswith("/"):
                raise ValueError(f"{tarball}: unexpected member {member.name!r} (expected everything under {TOP_DIR}/)")
        if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12 / 3.11.4: refuse links and odd modes too
            tar.extractall(dest, filter="data")
        else:
            tar.extractall(dest)


def build_index(top: Path) -> SplitIndex:
    """The games of each split under ``top`` (a ``json_2.1.1`` folder), as AlfredTWEnv would collect them."""
    index: SplitIndex = {}
    for split in SPLITS:
        split_dir = top / split
        if not split_dir.is_dir():
            continue
        games: list[tuple[str, str]] = []
        for root, _dirs, files in os.walk(split_dir):
            game = Path(root).relative_to(split_dir).as_posix()
            # (AlfredTWEnv tests the absolute path; the relative one cannot trip on the cache's location)
            if "traj_data.json" not in files or "movable" in game or "Sliced" in game:
                continue
            game_file = Path(root) / GAME_FILE
            task_type = json.loads((Path(root) / "traj_data.json").read_text()).get("task_type")
            if task_type not in TASK_TYPES or not game_file.is_file():
                continue
            if not json.loads(game_file.read_text()).get("solvable", False):
                continue
            games.append((game, TASK_TYPES[task_type]))
        index[split] = sorted(games)
    return index


def unpack_once(tarball: Path, cache_dir: Path) -> tuple[Path, bool]:
    """Unpack ``tarball`` into ``cache_dir/<stem>`` unless a complete copy is there.

    Returns the folder and whether this call did the unpacking. Safe when several processes
    call it at once: one unpacks under the lock, the others wait and then find it complete.
    """
    stem = tarball_stem(tarball)
    final = cache_dir / stem
    if _is_complete(final, tarball):  # fast path: no lock once the cache is there
        return final, False
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _file_lock(cache_dir / f".{stem}.lock"):
        if _is_complete(final, tarball):  # another process finished while we waited
            return final, False
        for leftover in cache_dir.glob(f".{stem}.tmp-*"):  # from a process killed mid-unpack
            shutil.rmtree(leftover, ignore_errors=True)
        t0 = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=f".{stem}.tmp-", dir=cache_dir))
        tmp.chmod(0o755)  # mkdtemp makes it private; the unpacked copy is plain readable data
        stale = cache_dir / f".{stem}.stale-{os.getpid()}"
        try:
            _extract(tarball, tmp)
            meta = {"source": tarball.name, "source_size": tarball.stat().st_size, "splits": build_index(tmp / TOP_DIR)}
            (tmp / INDEX_FILE).write_text(json.dumps(meta))
            if final.exists():  # an incomplete or outdated copy: move it aside, then swap in the new one
                final.rename(stale)
            tmp.rename(final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(stale, ignore_errors=True)
    log.info("alfworld: unpacked %s into %s in %.1f s (once per cache dir)", tarball.name, final, time.perf_counter() - t0)
    return final, True


# --------------------------------------------------------------------------- splits
def split_games(data_dir: Path, cache_dir: Path, split: str) -> tuple[Path, list[tuple[str, str]]]:
    """The folder holding ``split``'s games and its sorted ``(game folder, task type)`` list.

    ``valid_unseen`` alone comes from the small tarball unless the full one is unpacked already;
    every other split needs the full tarball.
    """
    if split not in SPLITS:
        raise ValueError(f"alfworld: unknown split {split!r}; choose one of {list(SPLITS)}")
    full, small = data_dir / FULL_TARBALL, data_dir / SMALL_TARBALL
    use_small = split == "valid_unseen" and small.is_file() and not (
        full.is_file() and _is_complete(cache_dir / tarball_stem(full), full))
    tarball = small if use_small else full
    if not tarball.is_file():
        raise FileNotFoundError(
            f"alfworld: {tarball} not found; point env.alfworld.data_dir or ${DATA_ENV_VAR} at the folder "
            f"holding {FULL_TARBALL} (and {SMALL_TARBALL})")
    unpacked, _ = unpack_once(tarball, cache_dir)
    index = _index_cache.get(unpacked)
    if index is None:
        index = _index_cache[unpacked] = json.loads((unpacked / INDEX_FILE).read_text())["splits"]
    if split not in index:
        raise FileNotFoundError(f"alfworld: {tarball} holds no {split!r} split")
    return unpacked / TOP_DIR / split, index[split]
