import numpy as np
import pytest

from jaxgpt.config import ConfigError, get_preset
from jaxgpt.nn.model import init_params
from jaxgpt.train.optimizer import decay_mask, lr_schedule
from jaxgpt.train.config import TrainConfig, apply_overrides


def test_decay_mask_skips_biases_layernorm_and_embeddings_by_default():
    p = init_params(get_preset("test"))["params"]
    mask = decay_mask(p)
    assert mask["h_0"]["attn"]["c_attn"]["kernel"] and mask["lm_head"]["kernel"]
    assert not mask["h_0"]["attn"]["c_proj"]["bias"]
    assert not mask["h_0"]["ln_1"]["scale"] and not mask["ln_f"]["bias"]
    assert not mask["wte"]["embedding"] and not mask["wpe"]["embedding"]
    assert decay_mask(p, decay_embeddings=True)["wte"]["embedding"]


def test_schedule_warmup_then_cosine_to_floor():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110)
    s = lr_schedule(cfg)
    assert float(s(0)) == 0.0
    np.testing.assert_allclose(float(s(5)), 5e-4, rtol=1e-6)
    np.testing.assert_allclose(float(s(10)), 1e-3, rtol=1e-6)
    np.testing.assert_allclose(float(s(60)), 1e-4 + 0.5 * 9e-4, rtol=1e-5)  # half way down the cosine
    np.testing.assert_allclose(float(s(110)), 1e-4, rtol=1e-6)
    np.testing.assert_allclose(float(s(500)), 1e-4, rtol=1e-6)


def test_overrides_are_typed_and_validated():
    m, t = apply_overrides(get_preset("test"), TrainConfig(),
                           ["model.n_layers=3", "train.lr=3e-4", "train.tensorboard=true", "train.devices=none"])
    assert m.n_layers == 3 and t.lr == 3e-4 and t.tensorboard is True and t.devices is None
    with pytest.raises(ConfigError, match="no field 'n_layer'"):
        apply_overrides(m, t, ["model.n_layer=3"])
    with pytest.raises(ConfigError, match="cannot read 'three'"):
        apply_overrides(m, t, ["model.n_layers=three"])
    with pytest.raises(ConfigError, match="section.field=value"):
        apply_overrides(m, t, ["lr=3"])
    with pytest.raises(ConfigError, match="divisible by micro_batches"):
        TrainConfig(batch_size=10, micro_batches=3)
    with pytest.raises(ConfigError, match="min_lr"):
        TrainConfig(lr=1e-4, min_lr=1e-3)


# --- Muon, parameter groups, warmup-stable-decay ------------------------------------------------

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from jaxgpt.reference import optim as ref  # noqa: E402
from jaxgpt.train.optimizer import build_optimizer, param_groups  # noqa: E402


def _tree_to_numpy(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def _steps_against_reference(cfg, tc: TrainConfig, steps: int, np_init, np_step):
    """`steps` steps of the same random gradients through `build_optimizer(tc)` (jitted, float64)
    and through the reference `np_step(np_params, np_grads, np_state, k)`; call under enable_x64.
    Returns (params, optimizer state, reference params, reference state, largest difference)."""
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), init_params(cfg, seed=0))
    tx = build_optimizer(tc)
    state, update = tx.init(params), jax.jit(tx.update)
    np_params = _tree_to_numpy(params)
    np_state = np_init(np_params)
    for k in range(steps):
        grads = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape) * 0.1), params)
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
        np_params, np_state = np_step(np_params, _tree_to_numpy(grads), np_state, k)
    return params, state, np_params, np_state, _max_diff(params, np_params)


def _max_diff(tree, np_tree) -> float:
    return max(jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                                            tree, np_tree)))


def test_muon_matches_the_numpy_reference_over_steps():
    """Five steps of random gradients through `build_optimizer` (Muon + AdamW, clipping, decay on
    both sides) against `reference.optim.muon_step`, in float64: scanned layers give (L, in, out)
    kernels, orthogonalised per layer; wide and tall matrices both occur."""
    cfg = get_preset("test", scan_layers=True)
    tc = TrainConfig(optimizer="muon", schedule="wsd", lr=3e-3, min_lr=3e-4, muon_lr=0.05, warmup_steps=1,
                     max_steps=5, weight_decay=0.1, muon_weight_decay=0.01, grad_clip=0.5, beta2=0.95)
    adam_lr, muon_lr = lr_schedule(tc), lr_schedule(tc, tc.muon_lr)

    def np_step(np_params, np_grads, np_state, k):
        return ref.muon_step(np_params, np_grads, np_state, float(adam_lr(k)), float(muon_lr(k)),
                             momentum=tc.muon_momentum, ns_steps=tc.muon_ns_steps, muon_weight_decay=tc.muon_weight_decay,
                             b1=tc.beta1, b2=tc.beta2, eps=tc.eps, weight_decay=tc.weight_decay, grad_clip=tc.grad_clip)

    with jax.enable_x64(True):
        params, _, _, _, diff = _steps_against_reference(cfg, tc, 5, ref.muon_init, np_step)
    # float64 both sides; as for AdamW (test_reference_grad), Adam's per-entry normalisation and
    # the Newton–Schulz polynomial (slope 3.4 at 0) carry rounding into O(lr) moves: we see up
    # to 1.2e-9 on parameters that moved by up to 0.25, and allow 1e-8
    assert diff < 1e-8, diff
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), params, init_params(cfg, seed=0))
    assert min(jax.tree.leaves(moved)) > 1e-4  # every parameter was updated


def test_schedule_free_adamw_matches_the_numpy_reference_over_steps():
    """Six steps of random gradients through `build_optimizer` (schedule-free AdamW: clipping, decay
    mask, warmup into a constant lr) against `reference.optim.schedule_free_adamw_step` in float64:
    the gradient point y (the state's params) and the averaged x (`model_params`) both."""
    from jaxgpt.train.optimizer import model_params

    tc = TrainConfig(optimizer="schedule_free_adamw", lr=3e-3, min_lr=3e-4, warmup_steps=2, max_steps=6,
                     weight_decay=0.1, grad_clip=0.5, beta1=0.9, beta2=0.95)
    lr = lr_schedule(tc)
    np.testing.assert_allclose([float(lr(t)) for t in (0, 1, 2, 10_000)], [0.0, 1.5e-3, 3e-3, 3e-3], rtol=1e-6)

    def np_step(np_params, np_grads, np_state, k):  # (Optax counts steps in int32: float32 lr values under x64)
        return ref.schedule_free_adamw_step(np_params, np_grads, np_state, lambda t: float(lr(np.int32(t))),
                                            b1=tc.beta1, b2=tc.beta2, eps=tc.eps, weight_decay=tc.weight_decay,
                                            grad_clip=tc.grad_clip)

    with jax.enable_x64(True):
        params, state, np_params, np_state, diff = _steps_against_reference(
            get_preset("test"), tc, 6, ref.schedule_free_init, np_step)
        x = model_params({"params": params, "opt_state": state})
    assert diff < 1e-10, diff  # seen: 6.7e-16 (no Newton–Schulz here)
    assert _max_diff(x, ref.schedule_free_eval(np_params, np_state, tc.beta1)) < 1e-10
    assert _max_diff(x, params) > 1e-4  # x and y differ: evaluating y would be wrong


def test_newton_schulz_reference_nearly_orthogonalises():
    """The reference itself: singular values of the result lie in the band Muon's quintic aims at
    (about 0.7–1.2 after five steps), whatever the input's scale and orientation."""
    rng = np.random.default_rng(1)
    for shape in ((16, 48), (48, 16), (3, 8, 8)):
        g = rng.normal(size=shape) * 10.0 ** rng.integers(-3, 3)
        s = np.linalg.svd(ref.newton_schulz(g), compute_uv=False)
        assert 0.6 < s.min() and s.max() < 1.25, (shape, s.min(), s.max())


@pytest.mark.parametrize("preset, overrides", [("test", {}), ("test", {"tie_embeddings": True}),
                                               ("test", {"scan_layers": True}), ("qwen3-moe-tiny", {})])
def test_param_groups_follow_the_name_rule(preset, overrides):
    params = init_params(get_preset(preset, **overrides))
    groups = param_groups(params)
    for (path, leaf), label in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(groups)):
        names = tuple(getattr(k, "key", str(k)) for k in path)
        assert (label == "muon") == ref.muon_group(names, np.asarray(leaf)), names
    labels = jax.tree.leaves(groups)
    assert labels.count("muon") >= 4 and labels.count("adamw") >= 3


def test_wsd_schedule_is_warmup_then_flat_then_linear_decay():
    tc = TrainConfig(schedule="wsd", lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110, decay_fraction=0.2)
    s = lr_schedule(tc)

    def want(step):  # decay over the last 20 of the 100 steps after warmup
        if step < 10:
            return 1e-3 * step / 10
        if step < 90:
            return 1e-3
        return 1e-3 + (1e-4 - 1e-3) * min(step - 90, 20) / 20

    for step in list(range(0, 120, 3)) + [89, 90, 109, 110, 500]:
        np.testing.assert_allclose(float(s(step)), want(step), rtol=1e-5, atol=1e-9, err_msg=str(step))
    muon = lr_schedule(tc, 0.02)  # same shape at Muon's peak
    np.testing.assert_allclose(float(muon(100)) / float(s(100)), 20.0, rtol=1e-5)


def test_optimizer_settings_are_validated():
    with pytest.raises(ConfigError, match="optimizer must be"):
        TrainConfig(optimizer="lion")
    with pytest.raises(ConfigError, match="schedule must be"):
        TrainConfig(schedule="linear")
    with pytest.raises(ConfigError, match="muon_momentum"):
        TrainConfig(muon_momentum=1.0)
    with pytest.raises(ConfigError, match="muon_ns_steps"):
        TrainConfig(muon_ns_steps=0)
    with pytest.raises(ConfigError, match="schedule-free AdamW needs 0 < beta1 < 1"):
        TrainConfig(optimizer="schedule_free_adamw", beta1=0.0)


def test_recipes_name_a_preset_and_its_train_settings():
    from jaxgpt.cli.main import build_parser
    from jaxgpt.train.recipes import RECIPES, recipe_configs

    model, train_cfg = recipe_configs("default")
    assert model == get_preset("small") and train_cfg.optimizer == "muon" and train_cfg.max_steps == 400
    assert recipe_configs("gpt2-classic")[1] == TrainConfig()  # the library's defaults stay the classic recipe
    with pytest.raises(ConfigError, match="unknown recipe .fast.; known: default, gpt2-classic, speedrun"):
        recipe_configs("fast")
    assert set(RECIPES) >= {"default", "gpt2-classic"}
    assert build_parser().parse_args(["train"]).recipe == "default"


def test_speedrun_recipe_is_what_its_ablation_kept():
    """The `speedrun` recipe is nanoGPT's CPU recipe plus the overrides the committed ablation kept
    (docs/results/speedrun_ablation.json), field by field, apart from what the benchmark sets per run."""
    import json
    from pathlib import Path

    from benchmarks.time_to_target import nanogpt_configs
    from jaxgpt.train.config import apply_overrides
    from jaxgpt.train.recipes import recipe_configs

    report = json.loads((Path(__file__).parent.parent / "docs/results/speedrun_ablation.json").read_text())
    model, train_cfg = apply_overrides(*nanogpt_configs(seed=0), report["kept_overrides"])
    recipe_model, recipe_train = recipe_configs("speedrun")
    assert recipe_model == model.replace(vocab_size=recipe_model.vocab_size)  # the char vocabulary comes from the data
    per_run = ("max_steps", "decay_steps", "eval_batches", "ckpt_every", "keep_checkpoints", "samples",
               "target_val_loss")  # the benchmark's protocol; the recipe trains 700 steps, its schedule's horizon
    assert recipe_train.replace(**{f: getattr(train_cfg, f) for f in per_run}) == train_cfg
    assert recipe_train.max_steps == train_cfg.decay_steps == 700
