"""The benchmark harness: its PyTorch baselines are the same model as jaxgpt's, and a worker measures."""

import numpy as np
import pytest
import torch

from benchmarks import bench
from jaxgpt.config import get_preset
from jaxgpt.nn.model import GPT, count_params, init_params, param_shapes
from benchmarks.torch_baselines import BookGPT, FastGPT, count_parameters

CFG = get_preset("test", drop_rate=0.0)


def test_torch_baselines_are_jaxgpts_model():
    """Same parameter count as jaxgpt's GPT, and the same function: jaxgpt's weights loaded into
    both PyTorch models give jaxgpt's logits (book: separate Q/K/V; fast: fused QKV)."""
    assert count_parameters(BookGPT(CFG)) == count_parameters(FastGPT(CFG)) == count_params(param_shapes(CFG))
    params = init_params(CFG, seed=1)["params"]
    ids = np.array([[1, 5, 9, 3, 7]])
    expected = np.asarray(GPT(CFG).apply({"params": params}, ids))
    p = {k: v for k, v in __import__("flax").traverse_util.flatten_dict(params, sep="/").items()}
    t = lambda a: torch.tensor(np.asarray(a))  # noqa: E731
    d = CFG.emb_dim
    for model in (BookGPT(CFG), FastGPT(CFG)):
        sd = {"tok_emb.weight": t(p["wte/embedding"]), "pos_emb.weight": t(p["wpe/embedding"]),
              "out_head.weight": t(p["lm_head/kernel"]).T}
        norm = ("scale", "shift") if hasattr(model.final_norm, "shift") else ("weight", "bias")  # book's or torch's
        sd.update({f"final_norm.{norm[0]}": t(p["ln_f/scale"]), f"final_norm.{norm[1]}": t(p["ln_f/bias"])})
        for i in range(CFG.n_layers):
            blk, pre = f"trf_blocks.{i}", f"h_{i}"
            qkv = t(p[f"{pre}/attn/c_attn/kernel"]).T  # (3d, d)
            if hasattr(model.trf_blocks[i], "att"):  # book layout
                sd.update({f"{blk}.att.W_query.weight": qkv[:d], f"{blk}.att.W_key.weight": qkv[d:2 * d],
                           f"{blk}.att.W_value.weight": qkv[2 * d:],
                           f"{blk}.att.out_proj.weight": t(p[f"{pre}/attn/c_proj/kernel"]).T,
                           f"{blk}.att.out_proj.bias": t(p[f"{pre}/attn/c_proj/bias"]),
                           f"{blk}.ff.0.weight": t(p[f"{pre}/mlp/c_fc/kernel"]).T, f"{blk}.ff.0.bias": t(p[f"{pre}/mlp/c_fc/bias"]),
                           f"{blk}.ff.2.weight": t(p[f"{pre}/mlp/c_proj/kernel"]).T, f"{blk}.ff.2.bias": t(p[f"{pre}/mlp/c_proj/bias"]),
                           f"{blk}.norm1.scale": t(p[f"{pre}/ln_1/scale"]), f"{blk}.norm1.shift": t(p[f"{pre}/ln_1/bias"]),
                           f"{blk}.norm2.scale": t(p[f"{pre}/ln_2/scale"]), f"{blk}.norm2.shift": t(p[f"{pre}/ln_2/bias"])})
            else:
                sd.update({f"{blk}.c_attn.weight": qkv, f"{blk}.c_proj.weight": t(p[f"{pre}/attn/c_proj/kernel"]).T,
                           f"{blk}.c_proj.bias": t(p[f"{pre}/attn/c_proj/bias"]),
                           f"{blk}.c_fc.weight": t(p[f"{pre}/mlp/c_fc/kernel"]).T, f"{blk}.c_fc.bias": t(p[f"{pre}/mlp/c_fc/bias"]),
                           f"{blk}.mlp_proj.weight": t(p[f"{pre}/mlp/c_proj/kernel"]).T,
                           f"{blk}.mlp_proj.bias": t(p[f"{pre}/mlp/c_proj/bias"]),
                           f"{blk}.ln_1.weight": t(p[f"{pre}/ln_1/scale"]), f"{blk}.ln_1.bias": t(p[f"{pre}/ln_1/bias"]),
                           f"{blk}.ln_2.weight": t(p[f"{pre}/ln_2/scale"]), f"{blk}.ln_2.bias": t(p[f"{pre}/ln_2/bias"])})
        model.load_state_dict(sd, strict=False)
        missing = set(model.state_dict()) - set(sd) - {k for k in model.state_dict() if k.endswith(".mask")}
        assert not missing, missing
        with torch.no_grad():
            got = model.eval()(torch.tensor(ids)).numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", bench.TRAIN_IMPLS)
def test_worker_measures_a_training_step(monkeypatch, impl):
    monkeypatch.setitem(bench.WORKLOADS, "unit", bench.Workload("train", "test", {"drop_rate": 0.1}, batch=2,
                                                                  seq_len=16, steps=2, warmup=1))
    result = bench.run_worker("unit", impl)
    assert len(result["step_s"]) == 2 and all(t > 0 for t in result["step_s"])
    assert result["peak_rss_bytes"] > 10**7 and result["compile_s"] >= 0


@pytest.mark.parametrize("impl", bench.DECODE_IMPLS)
def test_worker_measures_a_decode(monkeypatch, impl):
    monkeypatch.setitem(bench.WORKLOADS, "unit", bench.Workload("decode", "test", {"tie_embeddings": True}, batch=2,
                                                                  seq_len=4, new_tokens=5, steps=1, warmup=1,
                                                                  impls=bench.DECODE_IMPLS))
    result = bench.run_worker("unit", impl)
    assert len(result["step_s"]) == 1 and result["step_s"][0] > 0
    assert ("bf16" in result["detail"]) == impl.endswith("-bf16")


def test_markdown_report_has_a_row_per_implementation():
    report = {"matmul_peak_flops": {"numpy": 1e11, "jax": 2e11}, "mfu_denominator": 2e11, "rounds": 2,
              "workloads": {"w": {"workload": {"note": "a note"}, "speedup": {"jaxgpt_vs_torch-book": 1.5},
                                  "results": {impl: {"step_s": 0.1, "tokens_per_s": 100.0, "mfu": 0.5, "compile_s": 1.0,
                                                     "peak_rss_gb": 1.0, "detail": "x"}
                                              for impl in ("jaxgpt", "torch-book")}}}}
    text = bench.markdown(report)
    assert "| torch-book (x) | 0.1000 | 100 | 50% | 1.0 | 1.00 |" in text and "200 GFLOP/s" in text
    assert "Speed-ups (median of per-round ratios): jaxgpt vs torch-book 1.50×" in text
