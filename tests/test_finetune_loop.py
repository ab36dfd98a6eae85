"""Finetuning: the book's data handling, classification heads and poolings, LoRA, frozen parameters."""

import json
import string

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt.finetune.classify import (book_spam_split, classifier_logits, encode_split, finetune_classifier, load_labeled,
                             load_sms_spam, new_classifier, pool, shuffled_split)
from jaxgpt.config import ConfigError, get_preset
from jaxgpt.finetune.loop import FinetuneConfig, build_finetune_optimizer, make_step, trainable_mask
from jaxgpt.finetune.lora import LoRAConfig, adapted_layers, init_lora, merge_lora
from jaxgpt.nn.model import GPT, init_params
from jaxgpt.data.tokenizer import CharTokenizer, GPT2Tokenizer

CFG = get_preset("test")


@pytest.fixture
def sms_rows(shared_data_dir):
    return load_sms_spam(shared_data_dir / "SMSSpamCollection")


def test_sms_loader_and_book_split(sms_rows):
    assert len(sms_rows) == 5572
    assert sum(label == "spam" for _, label in sms_rows) == 747
    train, val, test = book_spam_split(sms_rows)
    assert (len(train), len(val), len(test)) == (1045, 149, 300)
    everything = train + val + test
    assert sum(label == "spam" for _, label in everything) == 747 == sum(label == "ham" for _, label in everything)
    # the book's chapter 6: the longest training message is 120 GPT-2 tokens
    tok = GPT2Tokenizer()
    assert max(len(tok.encode(text)) for text, _ in train) == 120
    # the split replays pandas' seeded sampling, so it is the book's (checked once against pandas 2.3)
    assert train[0] == ("Dude how do you like the buff wind.", "ham")


def test_generic_labeled_files(tmp_path):
    rows = [{"text": f"message {i}", "label": ["a", "b", "c"][i % 3]} for i in range(30)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "d.csv").write_text("label,text\n" + "\n".join(f'{r["label"]},"{r["text"]}"' for r in rows))
    for name in ("d.jsonl", "d.csv"):
        loaded = load_labeled(tmp_path / name)
        assert loaded == [(r["text"], r["label"]) for r in rows]
    train, val, test = shuffled_split(loaded, balance=True)
    assert (len(train), len(val), len(test)) == (21, 3, 6)
    (tmp_path / "bad.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(ValueError, match="'label'"):
        load_labeled(tmp_path / "bad.jsonl")


def test_encode_split_pads_truncates_and_names_unknown_labels():
    tok = CharTokenizer.from_text("abcdefgh")
    split = encode_split([("abc", "x"), ("abcdefgh", "y")], tok, ["x", "y"], max_length=5, pad_id=tok.eot_id)
    np.testing.assert_array_equal(split.ids_nl, [[0, 1, 2, 8, 8], [0, 1, 2, 3, 4]])
    np.testing.assert_array_equal(split.lengths_n, [3, 5])
    with pytest.raises(ValueError, match="'z'"):
        encode_split([("a", "z")], tok, ["x", "y"], 5, tok.eot_id)


def test_poolings():
    h_btd = jnp.arange(2 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 3)
    lengths = jnp.array([2, 4])
    np.testing.assert_array_equal(pool(h_btd, lengths, "last"), h_btd[:, -1])
    np.testing.assert_array_equal(pool(h_btd, lengths, "last-nonpad"), np.stack([h_btd[0, 1], h_btd[1, 3]]))
    np.testing.assert_allclose(pool(h_btd, lengths, "mean"), np.stack([h_btd[0, :2].mean(0), h_btd[1].mean(0)]))


def test_last_nonpad_and_mean_ignore_padding():
    """Causal attention: padding after a message cannot change what the message's tokens see."""
    params = init_params(CFG)
    cfg = FinetuneConfig()
    clf = new_classifier(params["params"], CFG, 3, cfg)
    ids = np.array([[5, 6, 7, 1, 1, 1]], np.int32)
    for pooling in ("last-nonpad", "mean"):
        short = classifier_logits(clf, CFG, ids[:, :3], jnp.array([3]), pooling=pooling)
        padded = classifier_logits(clf, CFG, ids, jnp.array([3]), pooling=pooling)
        np.testing.assert_allclose(short, padded, rtol=1e-5, atol=1e-6)


def test_fresh_lora_equals_base_exactly_and_merge_is_low_rank_update():
    params = init_params(CFG)["params"]
    lora_cfg = LoRAConfig(rank=4, alpha=8.0)
    adapters = init_lora(params, lora_cfg, jax.random.key(1))
    # every dense layer: per block c_attn, attn c_proj, c_fc, mlp c_proj; plus the head
    assert len(adapted_layers(params, lora_cfg)) == 4 * CFG.n_layers + 1
    a = adapters["h_0"]["attn"]["c_attn"]["lora_A"]
    assert a.shape == (CFG.emb_dim, 4) and float(jnp.max(jnp.abs(a))) <= 0.5  # U(-1/sqrt(r), 1/sqrt(r))
    ids = jnp.array([[1, 2, 3, 4]])
    base = GPT(CFG).apply({"params": params}, ids)
    fresh = GPT(CFG).apply({"params": merge_lora(params, adapters, lora_cfg.scale)}, ids)
    np.testing.assert_array_equal(base, fresh)  # B = 0: bit-identical
    # with B nonzero the merged kernel is W + (alpha/r)·A·B, so x·W' = x·W + s·(x·A)·B
    adapters["h_0"]["mlp"]["c_fc"]["lora_B"] = jnp.ones((4, CFG.mlp_ratio * CFG.emb_dim))
    merged = merge_lora(params, adapters, lora_cfg.scale)
    x = np.random.default_rng(0).normal(size=(3, CFG.emb_dim)).astype(np.float32)
    w = np.asarray(params["h_0"]["mlp"]["c_fc"]["kernel"])
    a_np = np.asarray(adapters["h_0"]["mlp"]["c_fc"]["lora_A"])
    np.testing.assert_allclose(x @ np.asarray(merged["h_0"]["mlp"]["c_fc"]["kernel"]),
                               x @ w + 2.0 * (x @ a_np) @ np.ones((4, 128)), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(merged["h_1"]["mlp"]["c_fc"]["kernel"], params["h_1"]["mlp"]["c_fc"]["kernel"])
    with pytest.raises(ConfigError, match="targets"):
        LoRAConfig(targets=("nope",))


@pytest.mark.parametrize("trainable", ["head", "last-block", "lora", "all"])
def test_only_trainable_parameters_change(trainable):
    cfg = FinetuneConfig(trainable=trainable, lr=1e-2, lora=LoRAConfig(rank=2) if trainable == "lora" else None)
    params = new_classifier(init_params(CFG)["params"], CFG, 2, cfg)
    mask = trainable_mask(params, cfg, CFG.n_layers)
    before = jax.tree.map(np.array, params)

    def loss_fn(p, batch, rng, deterministic):
        logits = classifier_logits(p, CFG, batch["ids"], batch["lengths"], pooling="last", lora=cfg.lora)
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), batch["labels"]]), None

    tx = build_finetune_optimizer(cfg, mask)
    opt_state = tx.init(params)
    # the optimizer keeps Adam moments for trainable leaves only
    n_moment_values = sum(x.size for x in jax.tree.leaves(opt_state) if hasattr(x, "size") and x.ndim > 0)
    n_trainable = sum(p.size for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask)) if m)
    assert n_moment_values == 2 * n_trainable
    step = make_step(loss_fn, tx, mask)
    batch = {"ids": np.arange(32, dtype=np.int32).reshape(4, 8) % 60, "lengths": np.full(4, 8, np.int32),
             "labels": np.array([0, 1, 0, 1], np.int32)}
    for _ in range(3):
        params, opt_state, _, _ = step(params, opt_state, batch, jax.random.key(0))
    flat_before = jax.tree_util.tree_flatten_with_path(before)[0]
    for (path, old), new, trains in zip(flat_before, jax.tree.leaves(params), jax.tree.leaves(mask)):
        if trains:
            assert not np.array_equal(old, new) or "lora_A" in str(path) or "bias" in str(path), path
        else:
            np.testing.assert_array_equal(old, new, err_msg=str(path))  # frozen: bit-identical
    names = {str(p) for (p, _), m in zip(flat_before, jax.tree.leaves(mask)) if m}
    expect = {"head": ["'head'"], "last-block": ["'h_1'", "'ln_f'", "'head'"], "lora": ["'lora'", "'head'"],
              "all": ["'h_0'", "'wte'"]}[trainable]
    assert all(any(e in n for n in names) for e in expect)
    if trainable != "all":
        assert not any("'h_0'" in n and "lora" not in n for n in names)


def test_classifier_learns_an_easy_task_and_reloads(tmp_path):
    """Texts of 'a's are one class, texts of 'b's the other: a working loop reaches ~100%."""
    rng = np.random.default_rng(0)
    rows = [(("a", "b")[i % 2] * rng.integers(2, 12), "ab"[i % 2]) for i in range(200)]
    tok = CharTokenizer.from_text(string.printable)  # the prompting baseline writes English around the texts
    config = get_preset("test", vocab_size=tok.vocab_size)
    cfg = FinetuneConfig(epochs=2, lr=3e-3, trainable="all", batch_size=8)
    splits = shuffled_split(rows)
    results = finetune_classifier(init_params(config), config, tok, splits, cfg, tmp_path, pooling="last-nonpad",
                                  progress=False, prompt_shots=(0,))
    assert results["test_accuracy"] >= 0.95 and results["val_accuracy"] >= 0.95
    assert 0.0 <= results["prompting"]["0"] <= 1.0
    for name in ("accuracy.png", "loss.png", "results.json", "metrics.jsonl"):
        assert (tmp_path / name).is_file()
    from jaxgpt.finetune.classify import Classifier

    predictions = Classifier(tmp_path).predict(["aaaaa", "bbbbbbb"])
    assert [p["label"] for p in predictions] == ["a", "b"]
    assert abs(sum(predictions[0]["probabilities"].values()) - 1.0) < 1e-5


@pytest.mark.parametrize("bad_step, log_every", [(3, 100), (2, 1)])
def test_a_non_finite_loss_stops_finetuning_before_anything_is_saved(bad_step, log_every):
    """A loss that turns NaN at a step between logs (or on one) is caught before the epoch's end
    evaluates and saves: FloatingPointError naming the step, and `end_of_epoch` never called."""
    from jaxgpt.finetune.loop import fit

    params = {"gpt": {"w": jnp.ones((3,))}}
    cfg = FinetuneConfig(epochs=2, batch_size=1, lr=1e-2, trainable="all", log_every=log_every)

    def loss_fn(p, batch, rng, deterministic):
        loss = jnp.sum(p["gpt"]["w"] ** 2) * batch["x"][0]
        return jnp.where(batch["x"][0] == bad_step, jnp.nan, loss), {}

    saved = []
    with pytest.raises(FloatingPointError, match=f"non-finite at step {bad_step}"):
        fit(params, cfg, {"gpt": {"w": True}}, loss_fn, lambda epoch: ({"x": np.array([s + 1.0])} for s in range(4)),
            4, lambda p, epoch, step: saved.append(epoch) or {}, lambda record: None, progress=False)
    assert saved == []
