"""jaxgpt: a GPT built from scratch in JAX and Flax, checked against a NumPy float64 reference.

The public API, importable from here (`from jaxgpt import GPT, get_preset, generate`):
- configuration: `GPTConfig`, `get_preset`, `TrainConfig`
- the model (`jaxgpt.nn`): `GPT`, `init_params`, `param_counts`, `cross_entropy`
- tokenizers (`jaxgpt.data`): `GPT2Tokenizer`, `CharTokenizer`, `get_tokenizer`
- generation (`jaxgpt.inference`): `Decoder`, `generate`, `generate_batch`, `generate_text`
- training (`jaxgpt.train`): `train`
- weights (`jaxgpt.weights`): `load_for_inference`, `load_hf`, `save_hf`
- the NumPy reference: `reference`

Names are imported on first use (PEP 562), so `import jaxgpt` stays cheap and does not start JAX:
`jaxgpt.host_setup` must be able to set XLA flags before JAX is imported. The package map is
docs/architecture.md.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "GPTConfig": "jaxgpt.config", "get_preset": "jaxgpt.config", "ConfigError": "jaxgpt.config",
    "TrainConfig": "jaxgpt.train.config",
    "GPT": "jaxgpt.nn.model", "init_params": "jaxgpt.nn.model", "param_counts": "jaxgpt.nn.model",
    "cross_entropy": "jaxgpt.nn.model",
    "GPT2Tokenizer": "jaxgpt.data.tokenizer", "CharTokenizer": "jaxgpt.data.tokenizer",
    "get_tokenizer": "jaxgpt.data.tokenizer",
    "Decoder": "jaxgpt.inference.generate", "generate": "jaxgpt.inference.generate",
    "generate_batch": "jaxgpt.inference.generate", "generate_text": "jaxgpt.inference.generate",
    "train": "jaxgpt.train.loop",
    "load_for_inference": "jaxgpt.weights.checkpoint", "load_hf": "jaxgpt.weights.hf", "save_hf": "jaxgpt.weights.hf",
}
_MODULES = {"reference": "jaxgpt.reference"}

__all__ = sorted(_EXPORTS) + sorted(_MODULES)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _MODULES:
        value = importlib.import_module(_MODULES[name])
    else:
        raise AttributeError(f"module 'jaxgpt' has no attribute {name!r}")
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
