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
