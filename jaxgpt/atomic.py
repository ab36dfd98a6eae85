"""Writes that replace data, done atomically: a reader (or a kill -9) sees the old content or the
new, never a mix or nothing.

- `write_text`/`write_json`: a temporary file beside the target, renamed over it.
- `atomic_directory`: a folder built under a temporary name beside its target and renamed into
  place when complete. A non-empty target is refused unless `force`; with `force` the old folder
  is kept aside until the new one is in place, then removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator


class TargetExistsError(FileExistsError):
    """The output folder already holds something and replacing it was not asked for."""


def write_text(path: Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(text)
    tmp.replace(path)


def write_json(path: Path, obj) -> None:
    """Write JSON atomically (temporary file + rename)."""
    write_text(path, json.dumps(obj, indent=2))


def _non_empty(path: Path) -> bool:
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


def check_target(path: Path, force: bool, what: str = "output folder") -> None:
    """Refuse a non-empty `path` unless `force` (before any work is done)."""
    path = Path(path)
    if _non_empty(path) and not force:
        raise TargetExistsError(f"{what} {path} is not empty; choose another or pass --force to replace it")
    if path.exists() and not path.is_dir():
        raise TargetExistsError(f"{what} {path} is a file, not a folder")


@contextlib.contextmanager
def atomic_directory(target: Path, *, force: bool = False, what: str = "output folder") -> Iterator[Path]:
    """Yield a fresh temporary folder; on success it becomes `target` (see the module docstring).

    On an exception the temporary folder is removed and `target` is left exactly as it was.
    """
    target = Path(target)
    check_target(target, force, what)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
