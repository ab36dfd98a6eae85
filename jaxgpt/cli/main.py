"""The `jaxgpt` entry point: it builds the parser from the command modules and dispatches.

Each module of `jaxgpt.cli` adds its own subcommands (`add_commands`) and holds their handlers; the
work itself lives in the package. A command that must change the process before JAX starts sets
`before_jax` (see `jaxgpt.host_setup`).
"""

from __future__ import annotations

import argparse
import sys

from jaxgpt.cli import arena, data, evaluation, finetuning, generation, numerics, training, weights
from jaxgpt.cli.library_logs import library_logs_to_file

COMMAND_MODULES = (generation, training, weights, data, finetuning, numerics, evaluation, arena)


# commands that build models from configs: a plugin's kinds must be registered before they read one
PLUGIN_COMMANDS = ("train", "eval", "generate", "serve", "numerics", "arena", "evaluate", "attention-map",
                   "variant-check")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxgpt", description="A GPT built from scratch in JAX/Flax.")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        module.add_commands(sub)
    for name in PLUGIN_COMMANDS:
        sub.choices[name].add_argument("--plugin", action="append", default=[], metavar="FILE.py",
                                       help="a Python file that registers new kinds (repeatable; docs/extending.md)")
    return parser


def main(argv=None) -> int:
    """Run one command; `argv=None`: the process's own arguments (the process's entry point)."""
    entry_point = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if getattr(args, "before_jax", None) is not None:
        args.before_jax()

    from jaxgpt.arena.sweep import SweepError
    from jaxgpt.arena.tasks import TaskError
    from jaxgpt.config import ConfigError
    from jaxgpt.data.corpus import DataError
    from jaxgpt.data.tokenizer import TokenizerError
    from jaxgpt.finetune.loop import FinetuneInterrupted
    from jaxgpt.plugins import PluginError, load_plugins
    from jaxgpt.registry import RegistryError
    from jaxgpt.train.sharding import MeshError
    from jaxgpt.weights.checkpoint import CheckpointError
    from jaxgpt.weights.hf import WeightsError

    try:
        with library_logs_to_file(args.command, until_exit=entry_point):
            load_plugins(getattr(args, "plugin", ()))
            return args.func(args)
    except KeyboardInterrupt:  # Ctrl-C outside the loops that save first (start-up, loading, decoding)
        print(f"jaxgpt {args.command}: interrupted", file=sys.stderr)
        return 130
    except FinetuneInterrupted as e:
        print(f"jaxgpt {args.command}: {e}", file=sys.stderr)
        return 130
    except FloatingPointError as e:  # a NaN/inf loss
        print(f"jaxgpt {args.command}: error: {e}", file=sys.stderr)
        return 3
    except (ConfigError, DataError, SweepError, TaskError, TokenizerError, CheckpointError, WeightsError, MeshError,
            PluginError, RegistryError, ValueError, OSError) as e:
        print(f"jaxgpt {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
