"""Extension points as tables: an entry holds everything the rest of the code needs, so a new
variant is one entry — in the package or in a user's own file (`--plugin FILE.py`, `jaxgpt.plugins`).

`ATTENTION`: the attention kinds a config can select (`GPTConfig.attention`). An `AttentionKind`
holds the Flax layer's builder, the decoding cache it keeps, its NumPy reference (forward, and the
hand-written backward where there is one), the config fields it reads, the positions and windows
it takes, and the Hugging Face families that can hold it. The built-in kinds are the modules of
`jaxgpt.kinds`, imported on the first lookup (this module imports nothing heavy: configs are built
before JAX starts).
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

POSITIONS = ("learned", "rope", "alibi", "none")  # see jaxgpt.nn.positions

# GPTConfig fields that belong to some attention kinds only: a kind lists those it reads in
# `AttentionKind.options`; under any other kind they must keep their defaults.
ATTENTION_OPTIONS = {"latent_dim": None, "qk_norm": False, "head_size": None, "query_scale": None,
                     "attn_gate": False, "attn_sink": False, "differential": False}


class RegistryError(ValueError):
    """An unknown name, or a registration that would replace another entry."""


@dataclass(frozen=True)
class AttentionKind:
    """One attention kind, all the package needs of it.

    layer(config, *, impl, dtype, out_init_std, window) -> the Flax module of one block, named "attn",
        called as (x_btd, *, deterministic, positions_bt, kv_cache, cache_index, mask_bts) and returning
        y_btd, or (y_btd, new cache) when given a cache.
    empty_cache(config, batch, length, dtype, window) -> the layer's decoding cache: a dict of arrays
        whose first axis is the batch (decoding slots are rows of it).
    reference(x, attn_params, config, layer, record) -> the layer's output in NumPy float64, [b, t, d]
        (`record(op, value)` sees named intermediates, `jaxgpt.reference.layers.keep` by default).
    reference_backward(dout, x, attn_params, config, layer) -> (dx, grads of attn_params), or None.
    """

    name: str
    summary: str
    layer: Callable[..., Any]
    empty_cache: Callable[..., dict]
    reference: Callable[..., Any]
    reference_backward: Optional[Callable[..., Any]] = None
    options: frozenset = frozenset()  # fields of ATTENTION_OPTIONS this kind reads
    positions: tuple = POSITIONS  # position schemes it takes
    windows: bool = True  # whether it takes sliding_window / global_every
    grouped_kv: bool = True  # whether it takes n_kv_heads
    impls: tuple = ("naive",)  # attention backends (attn_impl) it honours; the property checks compare them
    exports: frozenset = frozenset()  # Hugging Face model types that can hold it
    check: Optional[Callable[[Any], Optional[str]]] = None  # a cross-field problem of a config, or None
    example: tuple = ()  # (field, value) pairs a small test config of this kind needs (`jaxgpt variant-check`)
    plugin: Optional[str] = field(default=None, compare=False)  # the file that registered it (None: built in)

    def problems(self, config) -> list[str]:
        """What in `config` this kind cannot honour (empty: fine)."""
        out = [f"{name} (attention {self.name!r} does not read it)" for name, default in ATTENTION_OPTIONS.items()
               if name not in self.options and getattr(config, name) != default]
        if config.position not in self.positions:
            out.append(f"position {config.position!r} (attention {self.name!r} takes {', '.join(self.positions)})")
        if not self.windows and config.sliding_window is not None:
            out.append(f"sliding_window (attention {self.name!r} attends to the whole context)")
        if not self.grouped_kv and config.n_kv_heads is not None:
            out.append(f"n_kv_heads (attention {self.name!r} keeps one state per head)")
        extra = self.check(config) if self.check is not None else None
        return out + ([extra] if extra else [])


ATTENTION: dict[str, AttentionKind] = {}
_current_plugin: list[Optional[str]] = [None]  # set by jaxgpt.plugins while a plugin file runs
_builtins_loaded = [False]


def register_attention(kind: AttentionKind) -> AttentionKind:
    """Add `kind` to the table (returned, so a module can keep it). A name already taken by another
    kind is refused: one name, one meaning, in every run that reads a config naming it."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", kind.name):
        raise RegistryError(f"attention kind names are lower-case identifiers, got {kind.name!r}")
    if _current_plugin[0] is not None and kind.plugin is None:
        kind = dataclasses.replace(kind, plugin=_current_plugin[0])
    _load_builtins()
    old = ATTENTION.get(kind.name)
    if old is not None and old != kind:
        where = old.plugin or "jaxgpt"
        raise RegistryError(f"attention kind {kind.name!r} is already registered (by {where}); choose another name")
    ATTENTION[kind.name] = kind
    return kind


def attention_kind(name: str) -> AttentionKind:
    """The registered kind `name`; RegistryError listing the known ones otherwise."""
    _load_builtins()
    if name not in ATTENTION:
        raise RegistryError(f"unknown attention kind {name!r}; registered: {', '.join(sorted(ATTENTION))}. A kind "
                            "defined in a plugin file needs --plugin FILE.py")
    return ATTENTION[name]


def attention_kinds() -> list[str]:
    _load_builtins()
    return sorted(ATTENTION)


def _load_builtins() -> None:
    if not _builtins_loaded[0]:
        _builtins_loaded[0] = True
        importlib.import_module("jaxgpt.kinds")  # each module there registers its kind
