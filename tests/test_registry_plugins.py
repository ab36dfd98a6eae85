"""The attention registry and plugins: every built-in kind passes `jaxgpt variant-check`; the
softpick plugin (examples/plugins/softpick.py, never named inside the package) trains, passes the
same checks and runs in an arena sweep; a run made with a plugin names it when it is missing;
registrations that would change a name's meaning are refused."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from jaxgpt.cli.main import main
from jaxgpt.config import ConfigError, get_preset
from jaxgpt.registry import AttentionKind, RegistryError, attention_kind, attention_kinds, register_attention

ROOT = Path(__file__).resolve().parent.parent
SOFTPICK = ROOT / "examples" / "plugins" / "softpick.py"
BUILT_IN = ("softmax", "mla", "linear", "gated_deltanet")


@pytest.mark.parametrize("kind", [*BUILT_IN, "softpick"])
def test_every_kind_passes_the_property_checks(kind, capsys):
    argv = ["variant-check", kind, "--json"] + (["--plugin", str(SOFTPICK)] if kind == "softpick" else [])
    code = main(argv)
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["ok"], report
    rows = {row["name"]: row for row in report["checks"]}
    assert len(rows) == 6 and all(r["ok"] for r in rows.values())
    assert rows["forward matches the float64 reference"]["rel_err"] <= 1e-9
    if kind in ("softmax", "softpick"):  # the kinds with a hand-written NumPy backward
        assert rows["backward matches the hand-written reference"]["rel_err"] <= 1e-8


def test_a_broken_kind_fails_the_checks_by_name(capsys):
    """A kind whose reference disagrees with its layer (by 0.1 %) fails "forward", exit 1 (the
    checks can fail). (A constant added to the branch would not do: LayerNorm removes it.)"""
    softmax = attention_kind("softmax")
    register_attention(AttentionKind(
        name="test_off_by_a_bit", summary="softmax whose reference is 0.1 % off", layer=softmax.layer,
        empty_cache=softmax.empty_cache, reference=lambda x, a, c, i, r: softmax.reference(x, a, c, i, r) * 1.001,
        positions=("learned", "none"), windows=False))
    assert main(["variant-check", "test_off_by_a_bit", "--json"]) == 1
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["checks"]}
    assert not rows["forward matches the float64 reference"]["ok"] and rows["causal"]["ok"]


def test_registrations_keep_one_meaning_per_name():
    with pytest.raises(RegistryError, match="'softmax' is already registered"):
        register_attention(AttentionKind(name="softmax", summary="", layer=None, empty_cache=None, reference=None))
    with pytest.raises(RegistryError, match="lower-case identifiers"):
        register_attention(AttentionKind(name="Soft Max", summary="", layer=None, empty_cache=None, reference=None))
    with pytest.raises(ConfigError, match="unknown attention kind 'nope'.*needs --plugin FILE.py"):
        get_preset("test", attention="nope")
    with pytest.raises(ConfigError, match="attention 'linear' cannot take: qk_norm .*; position 'rope'"):
        get_preset("test", attention="linear", position="rope", qk_norm=True)
    assert set(BUILT_IN) <= set(attention_kinds())


def test_the_package_names_each_kind_in_its_registration_and_at_most_one_use():
    """A kind's name (as an attention value or registered name) stands in at most two modules of
    jaxgpt/; the plugin's never."""
    sources = {p: p.read_text() for p in (ROOT / "jaxgpt").rglob("*.py")}
    for kind in BUILT_IN:
        pattern = re.compile(rf"(attention[^\n]{{0,12}}|name=)[\"']{kind}[\"']")
        modules = [str(p.relative_to(ROOT)) for p, text in sources.items() if pattern.search(text)]
        assert 1 <= len(modules) <= 2, (kind, modules)
    assert not [p for p, text in sources.items() if "softpick" in text.lower()]


def test_softpick_trains_and_its_run_names_the_plugin_when_missing(tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "--plugin", str(SOFTPICK), "--preset", "test", "--data", "python-docs", "--tokenizer", "char",
            "--max-steps", "4", "--out", str(run), "--no-progress", "--set", "model.attention=softpick",
            "--set", "train.eval_every=4", "--set", "train.ckpt_every=4", "--set", "train.samples=0",
            "--set", "train.eval_batches=2"]
    assert main(argv) == 0
    capsys.readouterr()
    env = dict(os.environ, PYTHONPATH=str(ROOT))  # a fresh process: this one has the plugin loaded
    done = subprocess.run([sys.executable, "-m", "jaxgpt.cli", "eval", "--checkpoint", str(run)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert f"uses attention 'softpick' from the plugin {SOFTPICK}" in done.stderr
    assert f"pass --plugin {SOFTPICK}" in done.stderr and "Traceback" not in done.stderr
    assert main(["eval", "--checkpoint", str(run), "--plugin", str(SOFTPICK), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["val_loss"] > 0


def test_softpick_runs_in_an_arena_sweep(tmp_path, capsys):
    sweep = tmp_path / "sweep.toml"
    sweep.write_text(f"""title = "softpick"
plugins = ["{SOFTPICK}"]
seeds = [0]
lengths = [1]
cost = false
[model]
n_layers = 1
emb_dim = 16
n_heads = 2
position = "none"
[train]
steps = 4
batch_size = 4
length = 16
eval_examples = 4
eval_every = 4
[tasks.induction]
[variants.mha]
[variants.softpick]
attention = "softpick"
""")
    assert main(["arena", str(sweep), "--out", str(tmp_path / "out"), "--quiet", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["runs"] == 2 and report["failed"] == 0 and "softpick" in report["variants"]
    spec = json.loads((tmp_path / "out" / "runs" / "softpick" / "seed-0" / "induction" / "result.json").read_text())
    assert spec["spec"]["model"]["attention"] == "softpick" and str(SOFTPICK) in spec["spec"]["plugins"]
