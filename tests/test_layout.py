"""The package layout rules (issue: layout by concern), checked on the source itself.

The import graph counts every import, also those inside functions. Layers, lowest first: the top
modules (config, host_setup, xla_tuning) < nn < reference, data < weights < inference < train <
finetune, numerics, arena < cli (evaluation beside train). A module may import its own layer and the ones below, never one above; nothing
imports cli; nothing imports torch or transformers; no cycles; no module over 400 lines and no
function over 80.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "jaxgpt"
LAYERS = {"config": 0, "host_setup": 0, "xla_tuning": 0, "atomic": 0, "registry": 0, "plugins": 0, "nn": 1, "reference": 2, "data": 2,
          "kinds": 2, "weights": 3,
          "inference": 4, "train": 5, "evaluation": 5, "finetune": 6, "numerics": 6, "arena": 6, "cli": 7}
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 80


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ("jaxgpt",) + path.relative_to(PACKAGE).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Every module `name` imports (absolute names), wherever the import statement stands."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = ".".join(pkg[: len(pkg) - node.level + 1] + ([node.module] if node.module else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES}
    return found


GRAPH = {name: {m for m in _imports(name, path) if m in MODULES and m != name} for name, path in MODULES.items()}


def _layer(name: str):
    parts = name.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


def test_every_module_has_a_layer():
    assert not [m for m in MODULES if m != "jaxgpt" and _layer(m) is None]


def test_no_import_cycles():
    # the package's own __init__ re-exports lazily (importlib), so it has no static edges
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in GRAPH:
        if v not in index:
            visit(v)
    assert cycles == []


def test_no_upward_imports_and_nothing_imports_cli():
    upward = [(m, t) for m, targets in GRAPH.items() for t in targets
              if m != "jaxgpt" and t != "jaxgpt" and _layer(t) > _layer(m)]
    assert upward == []
    assert [m for m, targets in GRAPH.items() if any(t.startswith("jaxgpt.cli") for t in targets)
            and not m.startswith("jaxgpt.cli")] == []


def test_the_reference_stands_alone():
    """The NumPy reference shares no code with the model it checks (a bug there would be invisible to
    the parity tests): it imports only itself, the config and the registry that names the kinds."""
    allowed = ("jaxgpt.reference", "jaxgpt.config", "jaxgpt.registry")
    leaks = {m: sorted(d for d in deps if not d.startswith(allowed)) for m, deps in GRAPH.items()
             if m.startswith("jaxgpt.reference")}
    assert not {m: d for m, d in leaks.items() if d}, leaks


def test_no_torch_or_transformers():
    offenders = [(m, t) for m, p in MODULES.items() for t in _imports(m, p)
                 if t.split(".")[0] in ("torch", "transformers")]
    assert offenders == []


def test_importing_jaxgpt_does_not_start_jax():
    import subprocess
    import sys

    code = "import sys, jaxgpt, jaxgpt.host_setup; assert 'jax' not in sys.modules, 'jax imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=PACKAGE.parent)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_sizes(name):
    source = MODULES[name].read_text()
    assert source.count("\n") <= MAX_MODULE_LINES, f"{name} has {source.count(chr(10))} lines"
    long = [(node.name, node.end_lineno - node.lineno + 1) for node in ast.walk(ast.parse(source))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert long == []


def test_public_api():
    import jaxgpt
    from jaxgpt import GPT, generate, get_preset  # noqa: F401  (the README's first line)

    for name in jaxgpt.__all__:
        assert getattr(jaxgpt, name) is not None
