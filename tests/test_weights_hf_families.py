"""Llama, Qwen3 and Gemma 3 weights in and out, checked against transformers on randomly initialised
models saved with `save_pretrained`: logits within 1e-4 (float32) both ways, the same greedy tokens
with the KV cache, sharded files, tied and untied heads, and refusals by name."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from conftest import random_hf_model  # noqa: E402
from jaxgpt.cli.main import main  # noqa: E402
from jaxgpt.config import get_preset  # noqa: E402
from jaxgpt.inference.generate import generate  # noqa: E402
from jaxgpt.nn.model import GPT, init_params  # noqa: E402
from jaxgpt.weights.hf import WeightsError, load_hf, save_hf  # noqa: E402

ATOL = 1e-4
COMMON = dict(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=64)
MODELS = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
              dict(tie_word_embeddings=False, rope_parameters={
                  "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(tie_word_embeddings=True)),
    "qwen3-untied": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(tie_word_embeddings=False)),
    "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM,
               dict(sliding_window=5, layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                    query_pre_attn_scalar=24)),
}
IDS = np.random.default_rng(0).integers(0, 96, (2, 21))


def _hf_model(name: str, seed: int = 0):
    config_cls, model_cls, extra = MODELS[name]
    return random_hf_model(config_cls, model_cls, seed, **COMMON, **extra)


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_import_matches_transformers_logits_and_greedy_tokens(tmp_path, name):
    model = _hf_model(name)
    model.save_pretrained(tmp_path, max_shard_size="40KB" if name == "llama" else "5GB")  # llama: sharded
    assert (tmp_path / "model.safetensors.index.json").is_file() == (name == "llama")
    params, cfg = load_hf(str(tmp_path))
    np.testing.assert_allclose(np.asarray(GPT(cfg).apply(params, IDS)), _logits(model, IDS), atol=ATOL)
    prompt = IDS[:1, :7]
    with torch.no_grad():
        theirs = model.generate(torch.tensor(prompt), max_new_tokens=14, do_sample=False, use_cache=True,
                                pad_token_id=0, eos_token_id=None).numpy()
    np.testing.assert_array_equal(generate(params, cfg, prompt, 14), theirs)  # KV-cached on our side too


@pytest.mark.parametrize("preset, cls", [("llama-tiny", transformers.LlamaForCausalLM),
                                         ("qwen3-tiny", transformers.Qwen3ForCausalLM),
                                         ("gemma3-tiny", transformers.Gemma3ForCausalLM)])
def test_export_loads_in_transformers_with_the_same_logits(tmp_path, preset, cls):
    cfg = get_preset(preset, tie_embeddings=preset != "llama-tiny")
    params = init_params(cfg, seed=4)
    save_hf(params, cfg, tmp_path / "out")
    hf = cls.from_pretrained(tmp_path / "out").eval()
    ids = IDS % cfg.vocab_size
    np.testing.assert_allclose(np.asarray(GPT(cfg).apply(params, ids)), _logits(hf, ids), atol=ATOL)
    again, cfg2 = load_hf(str(tmp_path / "out"))
    assert cfg2 == cfg
    for a, b in zip(sorted(np.asarray(x).tobytes() for x in __import__("jax").tree.leaves(params)),
                    sorted(np.asarray(x).tobytes() for x in __import__("jax").tree.leaves(again))):
        assert a == b  # the round trip is exact


@pytest.mark.parametrize("preset, changes, named", [
    ("llama-tiny", dict(post_norms=True), "post_norms=True"),
    ("qwen3-tiny", dict(logit_softcap=30.0), "logit_softcap=30.0"),
    ("gemma3-tiny", dict(query_scale=0.3), "query_scale=0.3"),
    ("gemma3-tiny", dict(mlp="swiglu"), "mlp='swiglu'"),
    ("llama-tiny", dict(position="alibi", rope_scaling=None), "position='alibi'"),
])
def test_export_refuses_what_the_target_class_cannot_hold(tmp_path, preset, changes, named):
    cfg = get_preset(preset, **changes)
    with pytest.raises(WeightsError, match=named.replace("(", r"\(").replace(")", r"\)")):
        save_hf(init_params(cfg), cfg, tmp_path / "out")


def test_import_refuses_options_it_cannot_compute(tmp_path):
    model = _hf_model("gemma3")
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "attn_logit_softcapping": 50.0}))
    with pytest.raises(WeightsError, match="attn_logit_softcapping"):
        load_hf(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3000}))
    with pytest.raises(WeightsError, match="layer_types has 3 entries but num_hidden_layers is 3000"):
        load_hf(str(tmp_path))
    older = {k: v for k, v in config.items() if k != "layer_types"}
    (tmp_path / "config.json").write_text(json.dumps({**older, "num_hidden_layers": 10**9}))
    with pytest.raises(WeightsError, match="n_layer=1000000000 but the weights hold 3 blocks"):
        load_hf(str(tmp_path))  # refused before anything of that size is built


def test_cli_converts_and_generates_with_prompt_ids(tmp_path, capsys):
    model = _hf_model("qwen3")
    model.save_pretrained(tmp_path / "hf")
    assert main(["generate", "--hf", str(tmp_path / "hf"), "--prompt-ids", "5,6,7", "--max-new-tokens", "6",
                 "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    with torch.no_grad():
        theirs = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=6, do_sample=False, pad_token_id=0,
                                eos_token_id=None).numpy()[0, 3:].tolist()
    assert record["tokens"] == theirs and record["prompt_ids"] == [5, 6, 7]
    assert main(["convert", "from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 0
    assert main(["convert", "to-hf", str(tmp_path / "run"), "--out", str(tmp_path / "back")]) == 0
    back = transformers.Qwen3ForCausalLM.from_pretrained(tmp_path / "back").eval()
    np.testing.assert_allclose(_logits(back, IDS), _logits(model, IDS), atol=1e-6)


def test_a_folder_tokenizer_is_used_for_text(tmp_path, capsys):
    """A model folder with its own tokenizer.json (read with the `tokenizers` library): text
    prompts, end-of-text from tokenizer_config.json, `eval --hf` on a corpus, and a converted run
    that keeps the tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    text = "the quick brown fox jumps over the lazy dog. " * 50
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=96, special_tokens=["<unk>", "<|endoftext|>"],
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()[:60]))
    assert tok.get_vocab_size() <= 96
    model = _hf_model("qwen3")
    model.save_pretrained(tmp_path / "hf")
    tok.save(str(tmp_path / "hf" / "tokenizer.json"))
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>",
                                                                       "chat_template": template}))
    (tmp_path / "corpus.txt").write_text(text)

    assert main(["generate", "--hf", str(tmp_path / "hf"), "--prompt", "the quick", "--max-new-tokens", "5",
                 "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    prompt_ids = tok.encode("the quick").ids
    with torch.no_grad():
        theirs = model.generate(torch.tensor([prompt_ids]), max_new_tokens=5, do_sample=False, pad_token_id=0,
                                eos_token_id=tok.token_to_id("<|endoftext|>")).numpy()[0, len(prompt_ids):]
    eos, expected = tok.token_to_id("<|endoftext|>"), theirs.tolist()
    assert record["tokens"] == (expected[:expected.index(eos)] if eos in expected else expected)
    assert main(["eval", "--hf", str(tmp_path / "hf"), "--data", str(tmp_path / "corpus.txt"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert np.isfinite(result["val_loss"]) and result["tokens"] > 0
    assert main(["convert", "from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(tmp_path / "run"), "--prompt", "the quick", "--max-new-tokens", "5",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == record["tokens"]
    assert main(["generate", "--checkpoint", str(tmp_path / "run"), "--prompt", "the fox", "--chat", "--json",
                 "--max-new-tokens", "3"]) == 0  # the template travels with the converted run
    assert json.loads(capsys.readouterr().out)["prompt"] == "user: the fox\nassistant:"


def test_a_tied_config_beside_a_different_stored_head_is_refused(tmp_path):
    _hf_model("qwen3-untied").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    with pytest.raises(WeightsError, match=r"tie_word_embeddings is true.*'lm_head\.weight' that is not "
                                           r"'model\.embed_tokens\.weight'"):
        load_hf(str(tmp_path))
