"""Today's families (Llama 3, Qwen3, Gemma 3 blocks) as settings of one model: NumPy parity of the
whole forward pass and hand-written backward of every new piece, and the model's properties
(causality, cached = uncached decoding, scan/remat, training)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jaxgpt import reference as ref
from jaxgpt.config import ConfigError, get_preset
from jaxgpt.nn.layout import stack_layers, unstack_layers
from jaxgpt.nn.mlp import MLP
from jaxgpt.nn.model import GPT, count_params, cross_entropy, init_params, param_shapes
from jaxgpt.nn.norms import RMSNorm
from jaxgpt.nn.positions import apply_rope

FAMILIES = ["llama-tiny", "qwen3-tiny", "gemma3-tiny"]


def _params(cfg, seed=0):
    """Fresh parameters with the norms' scales moved off their initial 1 (or 0): every scale matters."""
    params = init_params(cfg, seed=seed)
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, a: a + 0.2 * rng.normal(size=a.shape).astype(a.dtype) if "scale" in jax.tree_util.keystr(path)
        else a, params)


@pytest.mark.parametrize("name", FAMILIES + ["relu2"])
def test_family_matches_numpy_reference_float32(name):
    cfg = get_preset(name) if name != "relu2" else get_preset("test", mlp="relu2", mlp_hidden=48, logit_softcap=3.0)
    params = _params(cfg)
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 13))
    np.testing.assert_allclose(np.asarray(GPT(cfg).apply(params, ids)), ref.gpt_forward(ref.to_numpy(params), ids, cfg),
                               rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_family_matches_numpy_reference_x64(name):
    cfg = get_preset(name, dtype="float64")
    ids = np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 13))
    with jax.enable_x64(True):
        params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), _params(cfg))
        logits = GPT(cfg).apply(params, jnp.asarray(ids))
        assert logits.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(logits), ref.gpt_forward(ref.to_numpy(params), ids, cfg), rtol=1e-10,
                                   atol=1e-12)


@settings(max_examples=4)
@given(heads=st.sampled_from([(4, 4), (4, 2), (4, 1)]), head_size=st.sampled_from([None, 8, 24]),
       hidden=st.sampled_from([40, 96]), family=st.sampled_from(FAMILIES), t=st.integers(1, 12))
def test_drawn_family_shapes_match_the_reference(heads, head_size, hidden, family, t):
    n, m = heads
    cfg = get_preset(family, n_heads=n, n_kv_heads=m, head_size=head_size, mlp_hidden=hidden, emb_dim=32,
                     query_scale=None if family != "gemma3-tiny" else 0.2)
    params = _params(cfg, seed=t)
    ids = np.random.default_rng(t).integers(0, cfg.vocab_size, (1, t))
    np.testing.assert_allclose(np.asarray(GPT(cfg).apply(params, ids)), ref.gpt_forward(ref.to_numpy(params), ids, cfg),
                               rtol=1e-4, atol=2e-5)


# --- the new pieces' hand-written backward against JAX's autodiff of the JAX layers --------------

def _vjp_check(jax_fn, ref_forward, ref_backward, *inputs, rtol=1e-6):
    """jax.vjp of `jax_fn` at float64 vs the reference backward, for a random cotangent."""
    with jax.enable_x64(True):
        inputs64 = [jnp.asarray(x, jnp.float64) for x in inputs]
        out, vjp = jax.vjp(jax_fn, *inputs64)
        np.testing.assert_allclose(np.asarray(out), ref_forward(*inputs), rtol=1e-10, atol=1e-12)
        dout = np.random.default_rng(0).normal(size=out.shape)
        for got, want in zip(vjp(jnp.asarray(dout)), ref_backward(dout, *inputs)):
            np.testing.assert_allclose(np.asarray(got), want, rtol=rtol, atol=1e-10)


@pytest.mark.parametrize("unit_offset", [False, True])
def test_rms_norm_backward(unit_offset):
    rng = np.random.default_rng(3)
    x, scale = rng.normal(size=(2, 5, 8)), rng.normal(size=8)
    layer = RMSNorm(eps=1e-6, unit_offset=unit_offset, dtype=jnp.float64)

    def backward(dout, x, scale):
        dx, grads = ref.rms_norm_backward(dout, x, scale, 1e-6, unit_offset)
        return dx, grads["scale"]

    _vjp_check(lambda x, s: layer.apply({"params": {"scale": s}}, x),
               lambda x, s: ref.rms_norm(x, s, 1e-6, unit_offset), backward, x, scale)


@pytest.mark.parametrize("kind", ["gelu", "swiglu", "geglu", "relu2"])
def test_mlp_backward(kind):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(2, 3, 8))
    layer = MLP(hidden=12, kind=kind, use_bias=True, dtype=jnp.float64)
    with jax.enable_x64(True):
        params = ref.to_numpy(layer.init(jax.random.key(0), jnp.zeros((1, 1, 8)))["params"])
    params = jax.tree.map(lambda a: a + 0.1 * rng.normal(size=a.shape), params)
    names = sorted(params)

    def run_jax(x, *kernels):
        tree = {n: {"kernel": k, "bias": jnp.asarray(params[n]["bias"])} for n, k in zip(names, kernels)}
        return layer.apply({"params": tree}, x)

    def with_kernels(kernels):
        return {n: {"kernel": k, "bias": params[n]["bias"]} for n, k in zip(names, kernels)}

    def backward(dout, x, *kernels):
        dx, grads = ref.mlp_backward(dout, x, **with_kernels(kernels), kind=kind)
        return (dx, *(grads[n]["kernel"] for n in names))

    _vjp_check(run_jax, lambda x, *k: ref.mlp(x, **with_kernels(k), kind=kind), backward, x,
               *(params[n]["kernel"] for n in names))


def test_softcap_and_scaled_rope_backward():
    rng = np.random.default_rng(5)
    logits = 10 * rng.normal(size=(2, 3, 7))
    _vjp_check(lambda x: 4.0 * jnp.tanh(x / 4.0), lambda x: ref.softcap(x, 4.0),
               lambda d, x: (ref.softcap_backward(d, x, 4.0),), logits)
    x_btnh, pos = rng.normal(size=(2, 6, 3, 8)), np.broadcast_to(np.arange(6) * 700, (2, 6))
    scaling = (8.0, 1.0, 4.0, 64)  # positions well past the original context: all three bands of Llama 3's scaling
    to_bnth = lambda a: np.swapaxes(a, 1, 2)  # noqa: E731  the reference's head-major layout
    _vjp_check(lambda x: apply_rope(x, jnp.asarray(pos), 500.0, scaling),
               lambda x: to_bnth(ref.rope(to_bnth(x), pos, 500.0, scaling)),
               lambda d, x: (to_bnth(ref.rope_backward(to_bnth(d), pos, 500.0, scaling)),), x_btnh)


# --- properties of every family ------------------------------------------------------------------

@pytest.mark.parametrize("name", FAMILIES)
def test_family_is_causal_and_decodes_the_same_cached_and_uncached(name):
    from conftest import assert_causal_and_decodes_like_uncached

    assert_causal_and_decodes_like_uncached(_params(get_preset(name)), get_preset(name))  # past gemma3-tiny's window


@pytest.mark.parametrize("overrides", [dict(scan_layers=True, global_every=None, sliding_window=None),
                                       dict(remat="full")])
def test_scan_and_remat_give_the_same_loss_and_gradients(overrides):
    cfg = get_preset("gemma3-tiny", global_every=None, sliding_window=None)
    params = _params(cfg)
    ids = np.random.default_rng(7).integers(0, cfg.vocab_size, (2, 12))

    def loss(c, p):
        return cross_entropy(GPT(c).apply(p, ids[:, :-1]), ids[:, 1:])

    base_loss, base_grads = jax.value_and_grad(lambda p: loss(cfg, p))(params)
    other = cfg.replace(**overrides)
    other_params = stack_layers(params) if other.scan_layers else params
    other_loss, other_grads = jax.value_and_grad(lambda p: loss(other, p))(other_params)
    np.testing.assert_allclose(other_loss, base_loss, rtol=1e-6)
    other_grads = jax.tree.leaves(unstack_layers(other_grads) if other.scan_layers else other_grads)
    for g1, g2 in zip(jax.tree.leaves(base_grads), other_grads):
        np.testing.assert_allclose(g1, g2, rtol=1e-5, atol=1e-6)  # float32 sums in another order


def test_published_presets_have_transformers_parameter_counts():
    """The presets' shapes are the published ones: parameter counts equal the same configs in
    transformers (built on the meta device: no memory)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from jaxgpt.weights.hf_families import config_to_hf, family_of

    for name, cls, published in (("llama-3.2-1b", transformers.LlamaForCausalLM, 1_235_814_400),
                                 ("qwen3-0.6b", transformers.Qwen3ForCausalLM, 596_049_920),
                                 ("gemma-3-270m", transformers.Gemma3ForCausalLM, 268_098_176)):
        cfg = get_preset(name)
        kind, problems = family_of(cfg)
        assert problems == []
        hf_config = config_to_hf(cfg, kind)
        config_cls = transformers.AutoConfig.for_model(kind).__class__
        with torch.device("meta"):
            model = cls(config_cls(**{k: v for k, v in hf_config.items() if k not in ("architectures", "model_type")}))
        theirs = sum(p.numel() for p in model.parameters())
        assert count_params(param_shapes(cfg)) == theirs == published, (name, theirs)


def test_family_options_are_validated():
    with pytest.raises(ConfigError, match="norm"):
        get_preset("test", norm="batchnorm")
    with pytest.raises(ConfigError, match="mlp"):
        get_preset("test", mlp="glu")
    with pytest.raises(ConfigError, match="need position 'rope'"):
        get_preset("test", rope_scaling=8.0)
    with pytest.raises(ConfigError, match="norm_unit_offset"):
        get_preset("test", norm_unit_offset=True)
    with pytest.raises(ConfigError, match="finite"):
        get_preset("llama-tiny", logit_softcap=float("inf"))


def test_a_family_trains_from_the_command_line(tmp_path, capsys):
    from jaxgpt.cli.main import main

    corpus = tmp_path / "text.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    code = main(["train", "--preset", "qwen3-tiny", "--data", str(corpus), "--tokenizer", "char", "--out",
                 str(tmp_path / "run"), "--max-steps", "4", "--no-progress", "--set", "train.batch_size=4",
                 "--set", "train.eval_every=2", "--set", "train.samples=1", "--set", "train.sample_tokens=8",
                 "--set", "train.peak_flops=1e9", "--set", "train.context_length=32"])
    out = capsys.readouterr().out
    assert code == 0 and "completed at step 4" in out and "--- sample 1 ---" in out


def test_a_family_finetunes_with_lora_and_shards_its_gated_mlp(tmp_path, capsys):
    """LoRA finetuning (classification) runs on a family's blocks, adapting the gated MLP too, and
    the FSDP rules split the gate projection like the up projection."""
    import json

    from jax.sharding import PartitionSpec as P

    from jaxgpt.cli.main import main
    from jaxgpt.finetune.lora import LoRAConfig, adapted_layers
    from jaxgpt.train.sharding import spec_for

    cfg = get_preset("qwen3-tiny")
    layers = adapted_layers(init_params(cfg)["params"], LoRAConfig(targets=("mlp",)))
    assert ("h_0", "mlp", "c_gate") in layers and ("h_0", "mlp", "c_fc") in layers
    mesh = type("Mesh", (), {"shape": {"fsdp": 2, "data": 1}})()
    assert spec_for("params/h_0/mlp/c_gate/kernel", (64, 128), mesh) == P(None, "fsdp")
    rows = "\n".join(f"{t},{lab}" for t, lab in [("win a free prize now", "spam"), ("see you at lunch", "ham")] * 12)
    (tmp_path / "data.csv").write_text("text,label\n" + rows + "\n")
    code = main(["finetune", "classify", "--preset", "qwen3-tiny", "--data", str(tmp_path / "data.csv"),
                 "--trainable", "lora", "--epochs", "1", "--batch-size", "4", "--prompt-shots", "",
                 "--out", str(tmp_path / "run"), "--no-progress", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert 0.0 <= result["test_accuracy"] <= 1.0 and result["params"]["trainable"] < result["params"]["total"]


def test_a_family_is_served(tmp_path):
    """`jaxgpt serve` decodes a family model: a greedy completion equals the decoder's own."""
    from conftest import assert_serves_greedy_like_the_decoder
    from jaxgpt.data.tokenizer import CharTokenizer

    tok = CharTokenizer.from_text("abcdefgh ")
    cfg = get_preset("gemma3-tiny", vocab_size=tok.vocab_size)
    assert_serves_greedy_like_the_decoder(_params(cfg), cfg, tok)
