"""Writing outputs safely: whole files or nothing, checked before any work is done.

Every file the project writes goes through `atomic_target` (a hidden temporary
next to the target, renamed into place only when complete, removed on any
failure), so an interrupted or failed write never leaves a half-written file
under the final name.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from gateskip_core.errors import GateSkipError


def temporary_for(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


@contextlib.contextmanager
def atomic_target(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path to write; on success it replaces `path`, on failure it is removed."""
    path = Path(path)
    tmp = temporary_for(path)
    try:
        yield tmp
        tmp.replace(path)
    except OSError as err:
        raise GateSkipError(f"cannot write {path}: {err.strerror or err}") from None
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` then rename to `path`; nothing is left under either name if it fails."""
    with atomic_target(path) as tmp:
        write(tmp)


def write_all(outputs: dict[str | Path, Callable[[Path], None]]) -> None:
    """Write several outputs all or nothing: every temporary first, then every rename."""
    tmps: list[tuple[Path, Path]] = []
    try:
        for path, write in outputs.items():
            path = Path(path)
            tmps.append((temporary_for(path), path))
            write(tmps[-1][0])
        for tmp, path in tmps:
            tmp.replace(path)
    except OSError as err:
        raise GateSkipError(f"cannot write {getattr(err, 'filename', None) or path}: {err.strerror or err}") from None
    finally:
        for tmp, _ in tmps:
            tmp.unlink(missing_ok=True)


def check_writable(path: str | Path, option: str = "--out") -> Path:
    """Fail now, with one line, if `path` could not be written later (missing or read-only folder)."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise GateSkipError(f"{option}: folder {folder} does not exist")
    if path.is_dir():
        raise GateSkipError(f"{option}: {path} is a folder")
    if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise GateSkipError(f"{option}: cannot write to {path} (permission denied)")
    # Try it for real (permissions do not stop root; a read-only file system does). This also
    # removes a temporary an interrupted or killed run left behind for the same output.
    tmp = temporary_for(path)
    try:
        tmp.unlink(missing_ok=True)
        with open(tmp, "xb"):
            pass
    except OSError as err:
        raise GateSkipError(f"{option}: cannot write to {path} ({err.strerror or err})") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    return path
