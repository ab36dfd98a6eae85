"""The float64 divergence finder (`jaxgpt numerics`): healthy models stay inside their tolerances,
and a planted fault is named by its layer and operation."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxgpt.nn.attention_backends as backends
from jaxgpt.cli.main import main
from jaxgpt.config import get_preset
from jaxgpt.nn.model import init_params
from jaxgpt.numerics.divergence import (
    SAFETY, UNIT_ROUNDOFF, errors, first_divergence, forward_rows, gradient_rows, tolerance_for,
)


def _batch(cfg, b=2, t=16, seed=0):
    ids = np.random.default_rng(seed).integers(0, cfg.vocab_size, (b, t + 1))
    return ids[:, :-1], ids[:, 1:]


def _ratios(rows):
    return {(r["layer"], r["op"]): r["rel_err"] / r["tolerance"] for r in rows}


@pytest.mark.parametrize("preset,changes", [
    ("test", dict(dtype="float32")),
    ("test", dict(dtype="bfloat16", attn_impl="xla")),
    ("test", dict(attention="mla", latent_dim=16, position="rope")),
    ("gemma3-tiny", dict(dtype="bfloat16")),
    ("mixtral-tiny", dict(dtype="float32")),
])
def test_healthy_models_stay_inside_their_tolerances(preset, changes):
    cfg = get_preset(preset, **changes)
    rows = forward_rows(cfg, init_params(cfg, 0), *_batch(cfg))
    assert first_divergence(rows) is None, first_divergence(rows)
    ops = {r["op"] for r in rows if r["layer"] == cfg.n_layers - 1}
    assert {"ln_1", "attn.q", "attn.k", "attn.v", "attn.scores", "attn.weights", "attn.context", "attn", "ln_2",
            "mlp", "residual"} <= ops  # every layer's insides are compared, not just the outputs
    assert {(None, "embed"), (None, "ln_f"), (None, "logits"), (None, "loss")} <= set(_ratios(rows))
    # the margin measured when the safety factor was chosen (docs/numerics.md): below half the tolerance
    assert max(_ratios(rows).values()) < 0.5
    # end to end, errors accumulate but stay small: the logits' relative error is a few units of roundoff·sqrt(K)
    logits = next(r for r in rows if r["op"] == "logits")
    assert 0 < logits["global_rel_err"] < 50 * logits["tolerance"]


def test_a_perturbed_weight_is_found_in_its_layer_and_op():
    """The JAX copy of one MLP weight differs by 1e-3 in one entry (a conversion bug, a bad load)."""
    cfg = get_preset("llama-tiny", dtype="float32", attn_impl="naive")
    params = init_params(cfg, 0)
    bad = jax.tree.map(lambda a: a, params)
    bad["params"]["h_1"]["mlp"]["c_fc"]["kernel"] = bad["params"]["h_1"]["mlp"]["c_fc"]["kernel"].at[3, 5].add(1e-3)
    rows = forward_rows(cfg, params, *_batch(cfg), jax_params=bad)
    first = first_divergence(rows)
    assert (first["layer"], first["op"]) == (1, "mlp.c_fc")
    assert first["rel_err"] > 100 * first["tolerance"]
    before = rows[: rows.index(first)]
    assert before and all(r["ok"] for r in before)
    # measured alone, the operations after it are healthy again: only the fault's own op is flagged
    assert [(r["layer"], r["op"]) for r in rows if not r["ok"]] == [(1, "mlp.c_fc")]


def test_a_softmax_computed_in_bfloat16_is_found(monkeypatch):
    cfg = get_preset("test", dtype="float32", attn_impl="naive")
    params = init_params(cfg, 0)
    f32_softmax = backends.masked_softmax
    monkeypatch.setattr(backends, "masked_softmax",
                        lambda s, m, sinks_n=None: f32_softmax(s.astype(jnp.bfloat16), m, sinks_n)
                        .astype(jnp.bfloat16).astype(jnp.float32))
    rows = forward_rows(cfg, params, *_batch(cfg))
    first = first_divergence(rows)
    assert (first["layer"], first["op"]) == (0, "attn.weights")
    assert {r["op"] for r in rows if not r["ok"]} == {"attn.weights"}


def test_a_nan_is_found_where_it_enters():
    cfg = get_preset("test", dtype="float32", attn_impl="naive")
    params = init_params(cfg, 0)
    bad = jax.tree.map(lambda a: a, params)
    bad["params"]["h_1"]["ln_2"]["scale"] = bad["params"]["h_1"]["ln_2"]["scale"].at[0].set(jnp.nan)
    first = first_divergence(forward_rows(cfg, params, *_batch(cfg), jax_params=bad))
    assert (first["layer"], first["op"]) == (1, "ln_2")
    assert first["nonfinite"] > 0 and first["max_abs_err"] == float("inf")


def test_errors_and_tolerance_by_hand():
    assert errors([1.0, 2.0], [1.0, 2.5]) == (0.5, 0.2, 0)
    assert errors([np.nan, 1.0], [np.nan, 1.0]) == (0.0, 0.0, 0)  # a NaN both sides have was not introduced here
    assert errors([np.inf, 1.0], [3.0, 1.0])[2] == 1
    cfg = get_preset("test", dtype="bfloat16")  # bf16 inputs and outputs, float32 accumulation
    assert tolerance_for("attn.scores", cfg, 16) == SAFETY * (2.0**-8 + 2.0**-24 * np.sqrt(cfg.head_dim))
    assert tolerance_for("mlp", cfg.replace(dtype="float32"), 16) == SAFETY * 2.0**-24 * (1 + np.sqrt(cfg.hidden_dim))
    rope = cfg.replace(dtype="float32", position="rope")  # RoPE's float32 angles: an error growing with position
    assert tolerance_for("attn.q", rope, 64) == SAFETY * 2.0**-24 * (1 + np.sqrt(cfg.head_dim) + 64)
    assert UNIT_ROUNDOFF["float32"] == 2.0**-24


@pytest.mark.parametrize("preset", ["test", "llama-tiny"])
def test_gradients_match_the_float64_reference(preset):
    cfg = get_preset(preset, dtype="float32")
    rows, source = gradient_rows(cfg, init_params(cfg, 0), *_batch(cfg))
    assert source == ("numpy-backward" if preset == "test" else "jax-float64-autodiff")
    assert len(rows) == len(jax.tree.leaves(init_params(cfg, 0)))
    assert all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]
    assert rows[0]["layer"] is None and rows[-1]["op"].startswith("grad w")  # backprop order: head first, embeddings last


def test_numerics_command_json_and_plot(tmp_path, capsys):
    plot = tmp_path / "errors.png"
    code = main(["numerics", "--preset", "test", "--batch", "1", "--length", "8", "--grads", "--json",
                 "--plot", str(plot)])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["first_divergence"] is None
    assert set(report["rows"][0]) >= {"layer", "op", "max_abs_err", "rel_err", "tolerance", "ok"}
    assert any(r["op"].startswith("grad ") for r in report["rows"])
    assert report["setting"]["backend"] == jax.default_backend() and plot.stat().st_size > 10_000
