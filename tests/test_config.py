"""Config: YAML + overrides, unknown keys with the nearest valid one, out-of-range values refused."""

from __future__ import annotations

import pytest

from preftune.config import TrainConfig
from preftune.errors import PreftuneError


def test_yaml_with_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: m\ndata: d.jsonl\noutput_dir: out\nbeta: 0.2\nloss: sigmoid+sft_dummy\n".replace("+sft_dummy", ""))
    cfg = TrainConfig.from_yaml(p, {"beta": 0.3, "max_steps": 5})
    assert (cfg.beta, cfg.max_steps, cfg.loss) == (0.3, 5, "sigmoid")


def test_unknown_key_suggests_nearest(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: m\nlearning_rte: 0.1\n")
    with pytest.raises(PreftuneError, match="unknown config key 'learning_rte'.*did you mean 'learning_rate'"):
        TrainConfig.from_yaml(p)


@pytest.mark.parametrize("kw, msg", [
    ({"beta": 0}, "beta must be > 0.*larger keeps the policy closer"),
    ({"beta": -1.0}, "beta must be > 0"),
    ({"label_smoothing": 0.5}, r"label_smoothing must be in \[0, 0.5\)"),
    ({"label_smoothing": -0.1}, r"label_smoothing must be in \[0, 0.5\)"),
    ({"batch_size": 0}, "batch_size must be at least 1"),
    ({"max_prompt_length": 600, "max_length": 512}, "must be smaller than max_length"),
    ({"dtype": "float64"}, "dtype must be one of"),
    ({"reference": "cpy"}, "did you mean 'copy'"),
    ({"loss": "sigmod"}, "did you mean 'sigmoid'"),
    ({"learning_rate": "fast"}, "learning_rate must be a number, got .fast."),
    ({"reference": "lora_disabled"}, "needs lora: true"),
])
def test_invalid_values_are_refused(kw, msg):
    with pytest.raises(PreftuneError, match=msg):
        TrainConfig(**kw)


def test_combined_losses_parse():
    cfg = TrainConfig(loss="sigmoid+bco_pair", loss_weights=[0.8, 0.2])
    lc = cfg.loss_config()
    assert lc.loss_types == ("sigmoid", "bco_pair") and lc.loss_weights == (0.8, 0.2)
    assert TrainConfig(loss=["simpo"]).loss_config().needs_reference is False


def test_bad_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: [unclosed\n")
    with pytest.raises(PreftuneError, match="not valid YAML"):
        TrainConfig.from_yaml(p)
    p.write_text("- a\n- b\n")
    with pytest.raises(PreftuneError, match="must be a mapping"):
        TrainConfig.from_yaml(p)
