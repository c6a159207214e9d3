"""Every config field checked for type and range before anything is written; text stays text (YAML and flags);
YAML parsing bounded."""

from __future__ import annotations

from pathlib import Path

import pytest

from preftune.cli import build_parser, config_from_args
from preftune.config import MAX_YAML_VALUES, TrainConfig, flag_value, parse_yaml, read_yaml
from preftune.errors import PreftuneError


@pytest.mark.parametrize("kw, msg", [
    ({"adam_beta1": 2}, r"adam_beta1 must be in \[0, 1\) \(got 2\)"),
    ({"adam_beta1": -0.1}, r"adam_beta1 must be in \[0, 1\)"),
    ({"adam_beta2": 1.0}, r"adam_beta2 must be in \[0, 1\)"),
    ({"adam_epsilon": 0}, "adam_epsilon must be > 0"),
    ({"adam_epsilon": float("nan")}, "adam_epsilon must be a finite number"),
    ({"weight_decay": -1}, "weight_decay must be >= 0"),
    ({"seed": -1}, "seed must be at least 0"),
    ({"seed": 2**32}, "seed must be at most 4294967295"),
    ({"eval_batch_size": -1}, "eval_batch_size must be at least 0"),
    ({"eval_steps": -5}, "eval_steps must be at least 0"),
    ({"save_steps": -1}, "save_steps must be at least 0"),
    ({"save_total_limit": -2}, "save_total_limit must be at least 0"),
    ({"warmup_steps": -3}, "warmup_steps must be at least 0"),
    ({"max_steps": -1}, "max_steps must be at least 0"),
    ({"logits_chunk_size": -1}, "logits_chunk_size must be auto or a whole number >= 0"),
    ({"lora_alpha": 0}, "lora_alpha must be at least 1"),
    ({"lora_dropout": 1.0}, r"lora_dropout must be in \[0, 1\)"),
    ({"simpo_gamma": -0.5}, "simpo_gamma must be >= 0"),
    ({"sft_weight": -1}, "sft_weight must be >= 0"),
    ({"num_epochs": 1e30}, r"num_epochs must be in \(0, 1e\+06\]"),
    ({"batch_size": 2**40}, "batch_size must be at most 2147483647"),
    ({"max_steps": 2.5}, "max_steps must be a whole number"),
    ({"max_steps": True}, "max_steps must be a whole number"),
    ({"beta": "0.1x"}, "beta must be a number, got .0.1x."),
    ({"model": 123}, "model must be text, got int 123"),
    ({"output_dir": ["a"]}, "output_dir must be text"),
    ({"lora": "yes"}, "lora must be true or false, got 'yes'"),
    ({"progress": 1}, "progress must be true or false"),
    ({"data": {"a": 1}}, "data must be a path or a list of paths"),
    ({"eval_data": []}, "eval_data must be a path or a list of paths"),
    ({"loss": []}, "loss must be a name or a list of names"),
    ({"loss": [1]}, "loss must be a name or a list of names"),
    ({"lora_target_modules": {"q": 1}}, "lora_target_modules must be a name or a list of names"),
    ({"loss_weights": ["x"]}, "loss_weights must be a list of numbers"),
    ({"resume": 3}, "resume must be true, false or a checkpoint path"),
    ({"output_dir": "runs/a\x00b"}, "output_dir contains a NUL character"),
    ({"data": ["a.jsonl", "b\x00.jsonl"]}, "data contains a NUL character"),
])
def test_types_and_ranges_are_refused(kw, msg):
    with pytest.raises(PreftuneError, match=msg):
        TrainConfig(**kw)


def test_path_objects_become_text():
    cfg = TrainConfig(model=Path("m"), output_dir=Path("o"), data=[Path("a.jsonl"), "b.jsonl"], resume=Path("ck"))
    assert (cfg.model, cfg.output_dir, cfg.data, cfg.resume) == ("m", "o", ["a.jsonl", "b.jsonl"], "ck")
    import yaml

    yaml.safe_dump(cfg.to_dict())  # config.yaml can be written


def test_edge_values_are_accepted():
    cfg = TrainConfig(adam_beta1=0.0, adam_beta2=0.0, weight_decay=0, seed=2**32 - 1, eval_batch_size=0,
                      save_total_limit=0, simpo_gamma=0, max_steps=0, num_epochs=1e6, lora_dropout=0.0)
    assert cfg.seed == 2**32 - 1


# --- YAML: text stays text, bounded parsing ------------------------------------------------------------------

def test_yaml_text_fields_stay_as_written(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("output_dir: 2024-06-01\nmodel: 123\nprompt_field: 1\nchosen_field: yes\nbeta: 0.2\n"
                 "resume: true\ndata: [train.jsonl, 2024-01-01]\nreference_model: null\nloss: 1e3\n"
                 "lora: yes\nlearning_rate: 1e-6\n")
    v = read_yaml(p)
    assert v == {"output_dir": "2024-06-01", "model": "123", "prompt_field": "1", "chosen_field": "yes",
                 "beta": 0.2, "resume": True, "data": ["train.jsonl", "2024-01-01"], "reference_model": None,
                 "loss": "1e3", "lora": True, "learning_rate": "1e-6"}
    cfg = TrainConfig.from_dict({k: v[k] for k in v if k != "loss"})
    assert (cfg.output_dir, cfg.learning_rate) == ("2024-06-01", 1e-6)


def test_yaml_merge_keys_and_anchors_still_work(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("defaults: &d {beta: 0.3, seed: 9}\n<<: *d\noutput_dir: &o runs/x\ndata: *o\n")
    v = read_yaml(p)
    assert (v["beta"], v["seed"], v["output_dir"], v["data"]) == (0.3, 9, "runs/x", "runs/x")


def _bomb(levels: int = 9, width: int = 9) -> str:
    """The "billion laughs": each level a list of `width` aliases to the level below (9^9 = 387M strings)."""
    lines = ["l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]")
    return "\n".join(lines) + f"\ndata: *l{levels - 1}\n"


def test_yaml_alias_bomb_is_refused_without_expanding(tmp_path):
    p = tmp_path / "bomb.yaml"
    p.write_text(_bomb())
    with pytest.raises(PreftuneError, match=f"expands to more than {MAX_YAML_VALUES:,} values"):
        read_yaml(p)


@pytest.mark.parametrize("text, msg", [
    ("a: &a [*a]\n", "alias that contains itself"),
    ("data: " + "[" * 400 + "]" * 400 + "\n", "nested too deeply"),
    ("[1]: 2\n", "not a valid mapping"),
    ("model: [unclosed\n", "not valid YAML"),
])
def test_hostile_yaml_is_one_sentence(text, msg):
    with pytest.raises(PreftuneError, match=msg):
        parse_yaml(text, "config file c.yaml", mapping=True)


def test_oversized_config_file_is_refused(tmp_path):
    p = tmp_path / "big.yaml"
    p.write_text("notes: " + "x" * (1 << 20) + "\n")
    with pytest.raises(PreftuneError, match="a config is a few dozen keys"):
        read_yaml(p)


# --- flags ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, text, value", [
    ("output_dir", "2024-06-01", "2024-06-01"),
    ("model", "123", "123"),
    ("prompt_field", "1", "1"),
    ("prompt_field", "[a, b]", "[a, b]"),
    ("reference_model", "null", "null"),
    ("data", "1", "1"),
    ("data", "[a.jsonl, 2024-01-01]", ["a.jsonl", "2024-01-01"]),
    ("loss", "[sigmoid, ipo]", ["sigmoid", "ipo"]),
    ("resume", "true", True),
    ("resume", "2024-06-01", "2024-06-01"),
    ("beta", "0.1", 0.1),
    ("lora", "yes", True),
    ("max_steps", "7", 7),
    ("data", "a: b: c", "a: b: c"),  # not YAML: kept as typed
])
def test_flag_values(name, text, value):
    assert flag_value(TrainConfig, name, text) == value


def test_flags_reach_the_config_as_text():
    args = build_parser().parse_args(["train", "--output-dir", "2024-06-01", "--model", "123", "--prompt-field",
                                      "1", "--data", "0.5"])
    cfg = config_from_args(args)
    assert (cfg.output_dir, cfg.model, cfg.prompt_field, cfg.data) == ("2024-06-01", "123", "1", "0.5")
