"""`jaxgpt arena`: the shipped sweep's --smoke version end to end (runs, results.json, report,
plots), resumption, refusal of a changed sweep, the sweep file's checks and matched widths."""

import json
import shutil
from pathlib import Path

import pytest

from jaxgpt.arena.sweep import SweepError, parse_sweep
from jaxgpt.cli.main import main

SWEEP = Path(__file__).resolve().parent.parent / "experiments" / "arena" / "attention.toml"


@pytest.fixture(scope="module")
def smoke_out(tmp_path_factory):
    import os

    if not os.environ.get("JAXGPT_DATA_DIR"):
        pytest.skip("JAXGPT_DATA_DIR is not set: the sweep's language task reads tinyshakespeare")
    out = tmp_path_factory.mktemp("arena") / "out"
    assert main(["arena", str(SWEEP), "--out", str(out), "--smoke", "--quiet"]) == 0
    return out


def test_smoke_sweep_writes_results_report_and_plots(smoke_out):
    results = json.loads((smoke_out / "results.json").read_text())
    runs = results["runs"]
    assert not results["failed"]
    assert {(r["variant"], r["seed"], r["task"]) for r in runs} == {
        (v, s, t) for v in ("mha", "rope") for s in (0, 1) for t in ("mqar", "lm-tinyshakespeare", "cost")}
    mha, rope = results["variants"]["mha"], results["variants"]["rope"]
    # learned positions stop at the training length: n/a beyond it, never a number
    assert "mqar:acc@2L" not in mha and "mqar:acc@2L" in rope
    assert all(r["metrics"]["acc@2L"] is None for r in runs if r["variant"] == "mha" and r["task"] == "mqar")
    for key in ("mqar:acc@1L", "mqar:acc@1L/pairs=8", "lm-tinyshakespeare:loss@1L", "cost:params",
                "cost:flops_per_token", "cost:kv_bytes_per_token", "cost:decode_tokens_per_s_b8",
                "cost:prefill_tokens_per_s_b1", "cost:train_tokens_per_s", "cost:train_peak_bytes"):
        assert rope[key]["n"] == 2 and rope[key]["ci95"] is not None, key
        assert mha[key]["p_value"] is None
    assert 0.0 <= rope["lm-tinyshakespeare:loss@1L"]["p_value"] <= 1.0
    assert rope["cost:params"]["mean"] < mha["cost:params"]["mean"]  # no position table
    report = (smoke_out / "report.md").read_text()
    assert "| mha |" in report and "n/a" in report and "p=" in report and "pairs=8" in report
    for plot in ("training.png", "lengths.png", "pareto.png"):
        assert (smoke_out / plot).stat().st_size > 5000


def test_a_rerun_skips_finished_runs_and_redoes_a_lost_one(smoke_out, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(smoke_out, out)
    results = sorted(out.glob("runs/*/*/*/result.json"))
    assert len(results) == 12
    lost = out / "runs" / "rope" / "seed-1" / "mqar" / "result.json"
    lost.unlink()
    before = {p: p.stat().st_mtime_ns for p in results if p != lost}
    assert main(["arena", str(SWEEP), "--out", str(out), "--smoke", "--quiet"]) == 0
    assert lost.exists() and all(p.stat().st_mtime_ns == t for p, t in before.items())
    again = json.loads((out / "results.json").read_text())
    old = json.loads((smoke_out / "results.json").read_text())
    assert again["variants"]["mha"] == old["variants"]["mha"]
    # the rerun run trained on the same batches from the same init: the same result
    redo = next(r for r in again["runs"] if (r["variant"], r["seed"], r["task"]) == ("rope", 1, "mqar"))
    first = next(r for r in old["runs"] if (r["variant"], r["seed"], r["task"]) == ("rope", 1, "mqar"))
    assert redo["metrics"]["acc@1L"] == first["metrics"]["acc@1L"]
    assert redo["curve"][-1]["train_loss"] == pytest.approx(first["curve"][-1]["train_loss"], rel=1e-5)


def test_a_changed_sweep_is_refused_in_the_same_folder(smoke_out, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(smoke_out, out)
    changed = tmp_path / "changed.toml"
    changed.write_text(SWEEP.read_text().replace("lr = 3e-3", "lr = 1e-3"))
    assert main(["arena", str(changed), "--out", str(out), "--smoke", "--quiet"]) == 2
    assert "different settings" in capsys.readouterr().err


BASE = {"model": {"n_layers": 1}, "tasks": {"mqar": {"pairs": [2]}}, "variants": {"a": {}, "b": {"n_kv_heads": 1}}}


@pytest.mark.parametrize("change, message", [
    ({"colour": 1}, "unknown keys"),
    ({"variants": {}}, r"\[variants.NAME\]"),
    ({"tasks": {"nope": {}}}, "unknown arena task"),
    ({"tasks": {"mqar": {"pairs": [64]}}}, "at least 256 tokens"),
    ({"baseline": "c"}, "baseline 'c'"),
    ({"variants": {"a": {"n_kv_heads": 3}}}, "variant 'a'.*n_kv_heads"),
    ({"variants": {"a": {"wings": 2}}}, "variant 'a'.*wings"),
    ({"train": {"steps": 0}}, "steps must be a positive integer"),
    ({"train": {"stepz": 3}}, "unknown keys"),
    ({"seeds": [1, 1]}, "repeated"),
    ({"match": "vibes"}, "match must be one of"),
    ({"cost": "no"}, "cost must be true or false"),
    ({"compare": {"b": "zz"}}, r"\[compare\] b = 'zz'"),
    ({"variants": {"a b": {}, "a-b": {}}}, "variants 'a b' and 'a-b' would share the run folder 'a-b'"),
    ({"variants": {"A": {}, "a": {}}}, "variants 'A' and 'a' would share"),  # one folder on a case-insensitive disk
    ({"variants": {"x": {}, "..": {}}}, "variants 'x' and '..' would share the run folder 'x'"),
])
def test_bad_sweep_files_are_named(change, message):
    with pytest.raises(SweepError, match=message):
        parse_sweep({**BASE, **change})


def test_run_folders_stay_inside_the_output_folder(tmp_path):
    from jaxgpt.arena.run import run_dir

    for name in ("..", ".", "../../etc", "/abs", "a/../../b"):
        folder = run_dir(tmp_path, name, 0, "mqar").resolve()
        assert tmp_path.resolve() / "runs" in folder.parents, (name, folder)


def test_a_sweep_without_cost_runs():
    assert [t for _, _, t in parse_sweep({**BASE, "cost": False}).runs()] == ["mqar"] * 6  # 2 variants × 3 seeds
    assert [t for _, _, t in parse_sweep(BASE).runs()] == ["mqar", "cost"] * 6


def test_matched_parameters_and_flops():
    from jaxgpt.arena.matching import match_widths, stored_params, train_flops_per_token

    raw = {**BASE, "match": "params", "variants": {"a": {}, "mqa": {"n_kv_heads": 1}, "mla": {"attention": "mla",
                                                                                            "latent_dim": 8}}}
    sweep = parse_sweep(raw)
    matched = match_widths(sweep)
    vocab = 129
    target = stored_params(sweep.model_config("a", vocab))
    for name in ("mqa", "mla"):
        cfg = sweep.model_config("a", vocab).replace(**matched[name])
        assert abs(stored_params(cfg) - target) <= 3 * 8 * cfg.emb_dim, name  # within one width step
        assert matched[name]["mlp_hidden"] > 4 * cfg.emb_dim  # the smaller attention buys a wider MLP
    flops_sweep = parse_sweep({**raw, "match": "flops"})
    cfg = flops_sweep.model_config("a", vocab).replace(**match_widths(flops_sweep)["mqa"])
    base = train_flops_per_token(flops_sweep.model_config("a", vocab), 64)
    assert abs(train_flops_per_token(cfg, 64) - base) / base < 0.02
