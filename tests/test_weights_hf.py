"""GPT-2 weights in and out of the Hugging Face layout, against `transformers` (torch, CPU)."""

import json
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="parity tests need the test extra (torch, transformers)")
transformers = pytest.importorskip("transformers")

from jaxgpt.weights.checkpoint import load_for_inference  # noqa: E402
from jaxgpt.cli.main import main  # noqa: E402
from jaxgpt.config import GPTConfig  # noqa: E402
from jaxgpt.inference.generate import generate  # noqa: E402
from jaxgpt.weights.hf import WeightsError, load_hf, save_hf  # noqa: E402
from jaxgpt.nn.model import GPT, init_params  # noqa: E402

# float32 on both sides, same operations in a different order: logits of O(1) agree to ~1e-6;
# 1e-4 is the bound we promise.
ATOL = 1e-4


def _hf_model(tied=True, **kw):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=32, vocab_size=97,
                                  tie_word_embeddings=tied, bos_token_id=0, eos_token_id=0, **kw)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # non-trivial LayerNorms and biases, so every tensor matters
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


IDS = np.random.default_rng(0).integers(0, 97, (2, 20))


@pytest.mark.parametrize("tied", [True, False])
def test_import_matches_transformers_logits(tmp_path, tied):
    model = _hf_model(tied=tied)
    model.save_pretrained(tmp_path)
    params, cfg = load_hf(str(tmp_path))
    assert cfg.tie_embeddings is tied and cfg.qkv_bias and cfg.n_layers == 2
    np.testing.assert_allclose(GPT(cfg).apply(params, IDS), _hf_logits(model, IDS), atol=ATOL)


def test_sharded_checkpoint_import(tmp_path):
    model = _hf_model()
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    params, cfg = load_hf(str(tmp_path))
    np.testing.assert_allclose(GPT(cfg).apply(params, IDS), _hf_logits(model, IDS), atol=ATOL)


@pytest.mark.parametrize("qkv_bias, tied, shard", [(False, False, None), (True, True, 30_000)])
def test_export_loads_in_transformers_with_same_logits_and_greedy_tokens(tmp_path, qkv_bias, tied, shard):
    cfg = GPTConfig(vocab_size=97, context_length=32, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0,
                    qkv_bias=qkv_bias, tie_embeddings=tied)
    params = init_params(cfg, seed=3)
    save_hf(params, cfg, tmp_path, max_shard_bytes=shard)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    np.testing.assert_allclose(GPT(cfg).apply(params, IDS), _hf_logits(hf, IDS), atol=ATOL)
    prompt = IDS[:1, :6]
    with torch.no_grad():
        hf_tokens = hf.generate(torch.tensor(prompt), max_new_tokens=12, do_sample=False, use_cache=True,
                                pad_token_id=0, eos_token_id=None).numpy()
    np.testing.assert_array_equal(generate(params, cfg, prompt, 12), hf_tokens)
    again, cfg2 = load_hf(str(tmp_path))  # and back: the round trip is exact
    assert cfg2.replace(qkv_bias=qkv_bias, drop_rate=0.0) == cfg
    np.testing.assert_array_equal(again["params"]["wte"]["embedding"], params["params"]["wte"]["embedding"])


def test_bad_checkpoints_name_the_tensor(tmp_path):
    from safetensors.numpy import load_file, save_file

    model = _hf_model()
    model.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    name = "transformer.h.1.mlp.c_fc.weight"

    def write(ts):
        save_file(ts, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})

    write({k: v for k, v in tensors.items() if k != name})
    with pytest.raises(WeightsError, match=r"lacks.*h\.1\.mlp\.c_fc\.weight"):
        load_hf(str(tmp_path))
    write({**tensors, "transformer.h.9.attn.c_attn.weight": tensors[name]})
    with pytest.raises(WeightsError, match=r"does not use.*h\.9"):
        load_hf(str(tmp_path))
    write({**tensors, name: tensors[name][:, :5]})
    with pytest.raises(WeightsError, match=r"'transformer\.h\.1\.mlp\.c_fc\.weight' has shape \(32, 5\)"):
        load_hf(str(tmp_path))
    write({**tensors, name: tensors[name].astype(np.int32)})
    with pytest.raises(WeightsError, match="dtype int32"):
        load_hf(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsError, match="not a readable safetensors"):
        load_hf(str(tmp_path))
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "activation_function": "relu"}))
    with pytest.raises(WeightsError, match="tanh approximation"):
        load_hf(str(tmp_path))


def test_missing_model_name_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(WeightsError, match=r"looked in .*models--gpt2-medium"):
        load_hf("gpt2-medium")


def test_model_name_found_in_local_cache(tmp_path, monkeypatch):
    snap = tmp_path / "hub" / "models--openai-community--gpt2" / "snapshots" / "abc123"
    _hf_model().save_pretrained(snap)
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    params, cfg = load_hf("gpt2")
    assert cfg.vocab_size == 97


def test_convert_cli_both_directions(tmp_path, capsys):
    model = _hf_model()
    model.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "jaxgpt_tokenizer.json").write_text(json.dumps({"kind": "char", "chars": "".join(chr(32 + i) for i in range(96))}))
    assert main(["convert", "from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 0
    params, cfg, tok = load_for_inference(tmp_path / "run")
    np.testing.assert_allclose(GPT(cfg).apply(params, IDS), _hf_logits(model, IDS), atol=ATOL)
    assert tok.name == "char"
    assert main(["convert", "to-hf", str(tmp_path / "run"), "--out", str(tmp_path / "back")]) == 0
    back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "back").eval()
    np.testing.assert_allclose(_hf_logits(back, IDS), _hf_logits(model, IDS), atol=1e-6)
    capsys.readouterr()
    assert main(["generate", "--hf", str(tmp_path / "back"), "--prompt", "hi", "--max-new-tokens", "5", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["prompt"] == "hi" and len(out["tokens"]) <= 5


def test_export_replaces_a_stale_sharded_export_only_with_force(tmp_path):
    """A sharded export followed by an unsharded one: without --force it is refused; with it the
    old index and shards are gone, so from-hf imports the new model (it imported the old one)."""
    cfg = GPTConfig(vocab_size=97, context_length=32, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0)
    old, new = init_params(cfg, seed=1), init_params(cfg, seed=2)
    save_hf(old, cfg, tmp_path / "out", max_shard_bytes=30_000)
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    with pytest.raises(FileExistsError, match="not empty"):
        save_hf(new, cfg, tmp_path / "out")
    save_hf(new, cfg, tmp_path / "out", force=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]
    loaded, _ = load_hf(str(tmp_path / "out"))
    np.testing.assert_array_equal(loaded["params"]["wte"]["embedding"], np.asarray(new["params"]["wte"]["embedding"]))


@pytest.mark.parametrize("changes, named", [
    (dict(sliding_window=4), "sliding_window=4"), (dict(attention="linear"), "attention='linear'"),
    (dict(position="alibi"), "position='alibi'"), (dict(n_kv_heads=2), "n_kv_heads=2"),
    (dict(attention="mla", latent_dim=8), "attention='mla'"),
])
def test_export_refuses_what_gpt2_cannot_hold_by_name(tmp_path, changes, named):
    cfg = GPTConfig(vocab_size=97, context_length=32, emb_dim=32, n_heads=4, n_layers=2, **changes)
    with pytest.raises(WeightsError, match=re.escape(named)):
        save_hf(init_params(cfg), cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_self_contradicting_folders_are_refused_by_name(tmp_path):
    """A tied config beside a different stored head; a single file beside a shard index; a shard
    named outside the folder: each refused, naming what contradicts what (never one read silently)."""
    import shutil

    from safetensors.numpy import load_file, save_file

    untied = tmp_path / "untied"
    _hf_model(tied=False).save_pretrained(untied)
    config = json.loads((untied / "config.json").read_text())
    (untied / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    with pytest.raises(WeightsError, match=r"tie_word_embeddings is true, but .*'lm_head\.weight' that is not "
                                           r"'transformer\.wte\.weight' \(largest difference"):
        load_hf(str(untied))
    tensors = load_file(str(untied / "model.safetensors"))  # the stored head equal to the embedding: fine
    tensors["lm_head.weight"] = tensors["transformer.wte.weight"].copy()
    save_file(tensors, str(untied / "model.safetensors"), metadata={"format": "pt"})
    params, cfg = load_hf(str(untied))
    assert cfg.tie_embeddings and "lm_head" not in params["params"]

    both = tmp_path / "both"
    _hf_model().save_pretrained(both, max_shard_size="20KB")
    shutil.copy(untied / "model.safetensors", both / "model.safetensors")
    with pytest.raises(WeightsError, match=r"holds both model\.safetensors and model\.safetensors\.index\.json"):
        load_hf(str(both))

    escaping = tmp_path / "escaping"
    _hf_model().save_pretrained(escaping, max_shard_size="20KB")
    (tmp_path / "outside.safetensors").write_bytes(b"x")
    index = json.loads((escaping / "model.safetensors.index.json").read_text())
    for bad in ("../outside.safetensors", "/etc/passwd", "sub/model.safetensors", ".."):
        name = next(iter(index["weight_map"]))
        (escaping / "model.safetensors.index.json").write_text(
            json.dumps({**index, "weight_map": {**index["weight_map"], name: bad}}))
        with pytest.raises(WeightsError, match=f"names the shard '{re.escape(bad)}', which is not a file name inside"):
            load_hf(str(escaping))
    (escaping / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": 3}}))
    with pytest.raises(WeightsError, match="weight_map must map tensor names to shard file names"):
        load_hf(str(escaping))
