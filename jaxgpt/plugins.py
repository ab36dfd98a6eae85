"""Plugins: a user's own Python file that registers new kinds (`jaxgpt.registry`) before any
config is read — `--plugin FILE.py` on the commands that build models, `plugins = [...]` in an
arena sweep.

A plugin is imported once per process (by its resolved path). What it registered is recorded in a
run's metadata (`plugin_records`), so a later command on that run that lacks the plugin says which
file it needs, instead of "unknown attention kind".
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path
from typing import Iterable

from jaxgpt import registry


class PluginError(ValueError):
    """A plugin file is missing, fails to import, or registers nothing."""


_LOADED: dict[str, dict] = {}  # resolved path -> its record


def load_plugin(path) -> dict:
    """Import the plugin file at `path` (once per process); its record: path, sha256, the kinds it registered."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise PluginError(f"plugin {path} does not exist (give the path of a .py file)")
    key = str(path.resolve())
    if key in _LOADED:
        return _LOADED[key]
    source = path.read_bytes()
    before = set(registry.attention_kinds())  # the built-ins first: a plugin may not take their names
    name = f"jaxgpt_plugin_{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    registry._current_plugin[0] = str(path)
    try:
        sys.modules[name] = module
        spec.loader.exec_module(module)
    except registry.RegistryError:
        sys.modules.pop(name, None)
        raise
    except Exception as e:  # noqa: BLE001 - a user's file: report what it raised, where
        sys.modules.pop(name, None)
        raise PluginError(f"plugin {path} failed to import: {type(e).__name__}: {e}") from e
    finally:
        registry._current_plugin[0] = None
    kinds = sorted(set(registry.ATTENTION) - before)
    if not kinds:
        raise PluginError(f"plugin {path} registered nothing (call jaxgpt.registry.register_attention in it)")
    record = {"path": key, "sha256": hashlib.sha256(source).hexdigest(), "attention": kinds}
    _LOADED[key] = record
    return record


def load_plugins(paths: Iterable) -> list[dict]:
    return [load_plugin(p) for p in paths]


def loaded_records() -> list[dict]:
    """The records of every plugin this process imported (what a run stores in its metadata)."""
    return list(_LOADED.values())


def check_recorded(records, what: str) -> None:
    """Refuse, naming the file, a run whose kinds came from a plugin this process has not loaded."""
    registry.attention_kinds()
    for record in records or ():
        missing = [k for k in record.get("attention", ()) if k not in registry.ATTENTION]
        if missing:
            raise PluginError(f"{what} uses attention {', '.join(map(repr, missing))} from the plugin "
                              f"{record['path']} (sha256 {record['sha256'][:12]}…): pass --plugin {record['path']}")
