"""Property tests over random configs and random command lines: every refusal is one sentence (exit status 2),
never a traceback, and nothing is written.

Hypothesis runs derandomized (the same examples every run; a failure prints the falsifying example).
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from preftune.cli import main
from preftune.config import TrainConfig
from preftune.errors import PreftuneError

FIELDS = [f.name for f in dataclasses.fields(TrainConfig)]
SETTINGS = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["", "0", "-1", "1e-6", "nan", "inf", "true", "null", "~", "2024-06-01", "sigmoid", "[a, b]",
                     "{a: 1}", "a\x00b", "auto", "copy", "float32", "sigmoid+ipo"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                      st.dictionaries(st.text(max_size=4), inner, max_size=2)),
                      max_leaves=6)
keys = st.one_of(st.sampled_from(FIELDS), st.text(max_size=10))


def _one_sentence(text: str) -> None:
    assert "\n" not in text and "Traceback" not in text, text
    assert text.rstrip().endswith((".", ")", "?")) or "see" in text, text


@SETTINGS
@given(st.dictionaries(keys, values, max_size=6))
def test_random_config_dicts_validate_or_refuse_in_one_sentence(d):
    try:
        cfg = TrainConfig.from_dict(d, where="fuzz")
    except PreftuneError as e:
        _one_sentence(str(e))
        return
    yaml.safe_dump(cfg.to_dict())  # an accepted config can always be written to config.yaml


flag_names = st.sampled_from(["--" + n.replace("_", "-") for n in FIELDS] + ["--bogus", "--beat", "--lr"])
flag_values = st.one_of(
    st.text(min_size=0, max_size=15).filter(lambda t: not t.startswith("-")),
    st.sampled_from(["2024-06-01", "123", "1", "-1", "1e9", "nan", "[sigmoid, ipo]", "{a: 1}", "&a [*a]",
                     "true", "no", "0.5", ".inf", "a\x00b", "!!python/object:os.system ls", "[[[[[[", "*x"]))
argv_tokens = st.lists(st.one_of(st.tuples(flag_names, flag_values).map(list), flag_names.map(lambda f: [f])),
                       max_size=6).map(lambda groups: [t for g in groups for t in g])


@pytest.fixture
def empty_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


@SETTINGS
@given(argv_tokens)
def test_random_flags_exit_2_with_one_line_and_write_nothing(empty_cwd, capsys, tokens):
    # The model and data never exist, so every command line stops at a check: a refusal of the flags, or of the
    # missing model; nothing reaches the files.
    argv = ["train", *tokens, "--model", str(empty_cwd / "no-model"), "--data", str(empty_cwd / "no-data.jsonl")]
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, (argv, out, err)
    assert err.startswith("preftune: error: ") and err.count("\n") == 1, (argv, err)
    _one_sentence(err.strip())
    assert os.listdir(empty_cwd) == [], (argv, os.listdir(empty_cwd))


@SETTINGS
@given(st.dictionaries(st.sampled_from(FIELDS), values, max_size=5))
def test_random_yaml_files_exit_2_with_one_line_and_write_nothing(empty_cwd, capsys, d):
    cfg = empty_cwd.parent / f"{empty_cwd.name}.yaml"  # beside, not inside, the watched folder
    cfg.write_text(yaml.safe_dump({**d, "model": str(empty_cwd / "no-model")}, allow_unicode=True))
    code = main(["train", str(cfg)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, (d, err)
    _one_sentence(err.strip())
    assert os.listdir(empty_cwd) == []


def _command_flags() -> dict[str, list[str]]:
    from preftune.cli import COMMANDS
    from preftune.options import options_of

    return {cmd: ["--" + n.replace("_", "-") for n, _, opt in options_of(cls) if not opt.flag.get("positional")]
            for cmd, (cls, _) in COMMANDS.items() if cmd in ("inspect", "eval", "generate", "plan")}


COMMAND_FLAGS = _command_flags()
numbers = st.sampled_from(["0", "-1", "-2", "1", "2", "1e23", "nan", "inf", "-inf", "0.5", "1.5", "abc", "[1]",
                           "true", "", "cuda", "banana", "4294967296"])


@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.sampled_from(sorted(COMMAND_FLAGS)).flatmap(
    lambda cmd: st.tuples(st.just(cmd), st.lists(st.tuples(st.sampled_from(COMMAND_FLAGS[cmd]), numbers), max_size=4))))
def test_other_commands_refuse_in_one_line_and_write_nothing(empty_cwd, capsys, case):
    """inspect, eval, generate and plan take their flags from the same schema as train: whatever the numbers, a
    refusal is one line with exit status 2 (the model and data never exist, so every command line stops)."""
    command, flags = case
    missing = {"inspect": [str(empty_cwd / "no-data.jsonl")], "plan": ["--model", str(empty_cwd / "no-model")],
               "eval": ["--model", str(empty_cwd / "no-model"), "--data", str(empty_cwd / "no-data.jsonl")],
               "generate": ["--model", str(empty_cwd / "no-model"), "--data", str(empty_cwd / "no-prompts.txt")]}
    argv = [command, *missing[command], *[t for flag, value in flags for t in (flag, value)
                                          if flag not in ("--model", "--data", "--prompt", "--output")]]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("preftune: error: ") and err.count("\n") == 1, (argv, err)
    assert os.listdir(empty_cwd) == [], (argv, os.listdir(empty_cwd))
