"""Integrity records of saved checkpoint steps: a sha256 manifest of every file, verified on load.

Orbax writes a step into a temporary folder and renames it when complete, so an interrupted save
never looks finished; but nothing in Orbax notices bytes that change later (a bad disk, a bad
copy): flipped bits in the array data loaded as NaN losses and garbage text. So once a step is
finished (Orbax's post-finalization callback, and again when the checkpointer closes) it gets
`integrity.json`: the size and sha256 of each of its files. Loading a step rehashes its files and
refuses a step whose files differ, are missing or were added.

Every step saved now says so in its metadata (`SEALED_KEY` in `meta/metadata`), so a step that says
it was sealed but has no manifest (deleted, or the run was killed between the save and its record)
is refused rather than loaded unchecked. Steps written before manifests existed have neither: they
load as "unverified" (nothing to check).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

MANIFEST = "integrity.json"
SEALED_KEY = "integrity_record"  # in a step's JSON metadata: True when the step gets a manifest
_CHUNK = 1 << 22


def _files(step_dir: Path) -> list[Path]:
    return sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != MANIFEST
                  and not p.name.startswith(MANIFEST + "."))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _hashes(step_dir: Path, files: list[Path]) -> dict[str, dict]:
    """{relative path: {"bytes", "sha256"}}, hashed on a few threads (hashlib releases the GIL)."""
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) + 2)) as pool:
        digests = list(pool.map(_sha256, files))
    return {str(p.relative_to(step_dir)): {"bytes": p.stat().st_size, "sha256": d} for p, d in zip(files, digests)}


def write_manifest(step_dir: Path) -> None:
    """Record the files of a finished step (atomically: a temporary file renamed into place)."""
    step_dir = Path(step_dir)
    record = {"version": 1, "files": _hashes(step_dir, _files(step_dir))}
    tmp = step_dir / f"{MANIFEST}.tmp"
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(step_dir / MANIFEST)


def seal_finished_steps(directory: Path) -> None:
    """Write the manifest of every finished step in a manager's directory that has none yet."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for step_dir in directory.iterdir():
        if step_dir.name.isdigit() and step_dir.is_dir() and not (step_dir / MANIFEST).exists():
            try:
                write_manifest(step_dir)
            except FileNotFoundError:  # removed meanwhile (the manager keeps only the last k)
                pass


def _says_sealed(step_dir: Path) -> bool:
    """Whether the step's own JSON metadata (Orbax's `meta/metadata`) says it was saved to be sealed."""
    try:
        return json.loads((step_dir / "meta" / "metadata").read_text()).get(SEALED_KEY) is True
    except (OSError, ValueError, AttributeError):
        return False


def _an_older_step_is_sealed(step_dir: Path) -> bool:
    """Whether a step saved before this one in the same run (its `checkpoints/` or `best/`) has a
    manifest: then this one was written by code that seals too (runs saved before the metadata
    said so, `SEALED_KEY`)."""
    if not step_dir.name.isdigit():
        return False
    managers = [step_dir.parent] + ([step_dir.parent.parent / other for other in ("checkpoints", "best")
                                     if other != step_dir.parent.name] if step_dir.parent.name in ("checkpoints", "best") else [])
    return any(d.name.isdigit() and int(d.name) < int(step_dir.name) and (d / MANIFEST).exists()
               for manager in managers if manager.is_dir() for d in manager.iterdir())


def problem(step_dir: Path) -> Optional[str]:
    """None if the step is intact (or predates manifests), else what is wrong with it, in a few words."""
    step_dir = Path(step_dir)
    stats = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in [step_dir / MANIFEST, *_files(step_dir)]
                  if p.exists())
    found = _problem(str(step_dir), stats)
    if found is None and not (step_dir / MANIFEST).exists() and _an_older_step_is_sealed(step_dir):
        return (f"its integrity record {MANIFEST} is missing, though older steps of this run have theirs "
                "(deleted, or the run was stopped before recording it): its files cannot be checked")
    return found


@functools.lru_cache(maxsize=64)
def _problem(step_dir: str, stats: tuple) -> Optional[str]:
    """`problem`, remembered while no file of the step changes (size or mtime): a run loads its
    metadata and its arrays from the same step, and both ask."""
    step_dir = Path(step_dir)
    manifest = step_dir / MANIFEST
    if not manifest.exists():
        if _says_sealed(step_dir):
            return (f"its integrity record {MANIFEST} is missing, though the step was saved to have one (deleted, or "
                    "the run was stopped before recording it): its files cannot be checked")
        return None
    try:
        recorded = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return f"its integrity record {MANIFEST} is unreadable"
    if not isinstance(recorded, dict) or not all(
            isinstance(entry, dict) and isinstance(entry.get("bytes"), int) and isinstance(entry.get("sha256"), str)
            for entry in recorded.values()):
        return f"its integrity record {MANIFEST} is malformed (files must map each path to its bytes and sha256)"
    files = _files(step_dir)
    present = {str(p.relative_to(step_dir)) for p in files}
    missing, extra = sorted(set(recorded) - present), sorted(present - set(recorded))
    if missing:
        return f"{len(missing)} file(s) missing, e.g. {missing[0]}"
    if extra:
        return f"{len(extra)} file(s) not in its integrity record, e.g. {extra[0]}"
    wrong_size = [name for name in sorted(recorded) if (step_dir / name).stat().st_size != recorded[name]["bytes"]]
    if wrong_size:
        return f"{len(wrong_size)} file(s) changed size, e.g. {wrong_size[0]}"
    actual = _hashes(step_dir, files)
    changed = [name for name in sorted(recorded) if actual[name]["sha256"] != recorded[name]["sha256"]]
    if changed:
        return f"{len(changed)} file(s) changed content (sha256 mismatch), e.g. {changed[0]}"
    return None
