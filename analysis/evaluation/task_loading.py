"""lm-eval tasks resolved and their data loaded before any model work, each failure one sentence.

Names may be tasks, groups or tags (`gateskip_heldout`: every shipped task); they are expanded
to their leaf tasks, which are evaluated one by one (so each gets its own compute account).
The shipped tasks (analysis/evaluation/tasks) are always on the include path.

On a machine that cannot reach the Hugging Face Hub, the datasets library is switched to offline
mode first: a task whose data is not cached then fails at once with one line (online, it would
retry for half a minute and print a traceback).
"""

from __future__ import annotations

import functools
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from gateskip_core.errors import GateSkipError

from . import SHIPPED_TASKS_DIR

HUB_HOST = "huggingface.co"


def hub_reachable(timeout: float = 2.0) -> bool:
    """Whether the Hub's name resolves and its port answers (a quick look, no request)."""
    try:
        with socket.create_connection((HUB_HOST, 443), timeout=timeout):
            return True
    except OSError:
        return False


def go_offline_if_needed() -> None:
    """Offline mode for `datasets` and the Hub client when the Hub cannot be reached (the user's
    own HF_*_OFFLINE settings win). Called before `datasets` is imported."""
    if "HF_DATASETS_OFFLINE" in os.environ or "HF_HUB_OFFLINE" in os.environ:
        return
    if not hub_reachable():
        os.environ["HF_DATASETS_OFFLINE"] = "1"
        os.environ["HF_HUB_OFFLINE"] = "1"


def include_paths(extra: Sequence[str] = ()) -> list[str]:
    """The shipped tasks' folder and the user's `--include-path` folders (each must exist)."""
    paths = [str(SHIPPED_TASKS_DIR)]
    for path in extra:
        if not Path(path).is_dir():
            raise GateSkipError(f"--include-path {path}: no such folder")
        paths.append(str(Path(path).resolve()))
    return paths


@dataclass(frozen=True)
class LoadedTasks:
    tasks: dict  # {task name: lm-eval Task}, data loaded
    manager: object  # the lm-eval TaskManager that found them (indexing every task YAML takes seconds: made once)


def load_tasks(names: Sequence[str], extra_include: Sequence[str] = ()) -> LoadedTasks:
    """The leaf tasks of `names`, data loaded. One-line errors: an unknown name (naming any YAML of
    the include paths that cannot be parsed), a task lm-eval cannot build, data not loadable here."""
    go_offline_if_needed()
    import logging

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise GateSkipError("--tasks is empty; give task names, e.g. gateskip_heldout")
    paths = tuple(include_paths(extra_include))
    manager = _manager(paths, with_builtin=False)  # the shipped and the user's tasks: indexed in a moment
    missing = [n for n in names if n not in manager.all_tasks]
    broken = _unreadable_yaml(paths[1:]) if missing else None
    if broken:  # the likely reason a task of the user's is missing
        raise GateSkipError(f"task(s) {', '.join(missing)} not found; {broken}")
    if missing:
        manager = _manager(paths, with_builtin=True)  # lm-eval's own tasks too: thousands of YAMLs
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise GateSkipError(
            f"unknown task(s) {', '.join(unknown)}: not an lm-eval task, group or tag, "
            "nor in the shipped tasks or --include-path"
        )
    tasks: dict = {}
    for name in names:
        tasks.update(_load_one(manager, name))
    return LoadedTasks(tasks, manager)


@functools.lru_cache(maxsize=4)
def _manager(paths: tuple[str, ...], with_builtin: bool):
    """An lm-eval TaskManager (memoised: the built-in index takes seconds to build)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(paths), include_defaults=with_builtin)


def _unreadable_yaml(folders: Sequence[str]) -> str | None:
    """'FILE is not a valid task YAML (why)' for the first YAML in `folders` lm-eval cannot parse."""
    from lm_eval.tasks._yaml_loader import load_yaml

    for folder in folders:
        for path in sorted(Path(folder).glob("**/*.yaml")):
            try:
                load_yaml(path, resolve_func=False)
            except Exception as err:  # a YAML syntax error, an include cycle, not a mapping, ...
                return f"{path} is not a valid task YAML ({_first_line(err)})"
    return None


def _load_one(manager, name: str) -> dict:
    try:
        return dict(manager.load([name])["tasks"])
    except ConnectionError as err:
        raise GateSkipError(f"task {name}: its data cannot be downloaded here ({_first_line(err)})") from None
    except FileNotFoundError as err:
        raise GateSkipError(f"task {name}: its data is missing ({_first_line(err)})") from None
    except Exception as err:  # lm-eval raises many kinds for a bad task config; name the task and why
        if _is_offline_error(err):
            raise GateSkipError(f"task {name}: its data cannot be downloaded here ({_first_line(err)})") from None
        raise GateSkipError(
            f"task {name}: lm-eval cannot build it ({type(err).__name__}: {_first_line(err)})"
        ) from None


def _is_offline_error(err: BaseException) -> bool:
    text = f"{type(err).__name__} {err}"
    return any(word in text for word in ("Offline", "offline", "Couldn't reach", "LocalEntryNotFound"))


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0][:300] if lines else type(err).__name__
