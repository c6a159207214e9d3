"""Resume continues a run only with the checkpoint's own model, data, task and math settings: each difference
is named and refused (unless --resume-force); the allow-listed settings may change."""

from __future__ import annotations

import json
import shutil

import pytest

from preftune import TrainConfig, sft, train
from preftune.errors import PreftuneError
from preftune.outputs.identity import MAY_CHANGE
from preftune.outputs.metrics import read_metrics


def _cfg(model, data, out, **kw) -> TrainConfig:
    base = dict(model=str(model), data=str(data), output_dir=str(out), max_steps=2, batch_size=4, progress=False,
                max_length=64, max_prompt_length=32, save_steps=1, learning_rate=1e-3)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def base_run(tiny_model_dir, pairs_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("identity") / "run"
    train(_cfg(tiny_model_dir, pairs_file, out))
    return out


@pytest.fixture
def run(base_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(base_run, out, symlinks=True)
    return out


@pytest.mark.parametrize("change, named", [
    ({"beta": 0.2}, ["beta 0.1 → 0.2"]),
    ({"loss": "ipo"}, ["loss 'sigmoid' → 'ipo'"]),
    ({"seed": 7}, ["seed 42 → 7"]),
    ({"batch_size": 8}, ["the global batch 4 (4 per device × 1 processes × 1 accumulation) → 8"]),
    ({"learning_rate": 1e-4}, ["learning_rate 0.001 → 0.0001"]),
    ({"max_prompt_length": 8}, ["max_prompt_length 32 → 8", "the training data differ as tokenized"]),
    ({"beta": 0.3, "loss": "hinge", "gradient_accumulation_steps": 2},
     ["beta 0.1 → 0.3", "loss 'sigmoid' → 'hinge'", "the global batch 4 (4 per device × 1 processes × 1 "
      "accumulation) → 8 (4 per device × 1 processes × 2 accumulation)"]),
])
def test_changed_math_is_refused_naming_each_change(run, tiny_model_dir, pairs_file, change, named):
    before = (run / "metrics.jsonl").read_bytes()
    with pytest.raises(PreftuneError, match="belongs to a different run") as e:
        train(_cfg(tiny_model_dir, pairs_file, run, resume=True, **change))
    for n in named:
        assert n in str(e.value)
    assert "--resume-force" in str(e.value)
    assert (run / "metrics.jsonl").read_bytes() == before  # refused before anything was written


def test_other_data_is_refused(run, tiny_model_dir, tmp_path):
    from helpers import make_pairs, write_jsonl

    other = write_jsonl(tmp_path / "other.jsonl", make_pairs(64, seed=99))
    with pytest.raises(PreftuneError, match=r"the training data differ as tokenized \(64 pairs, sha256 \w+ → 64 "
                                            r"pairs, sha256 \w+\)"):
        train(_cfg(tiny_model_dir, other, run, resume=True))


def test_other_model_is_refused(run, pairs_file, tmp_path):
    from helpers import build_tiny_model

    other = build_tiny_model(tmp_path / "other", seed=5)
    with pytest.raises(PreftuneError, match=r"the model differs \(model.safetensors changed\)"):
        train(_cfg(other, pairs_file, run, resume=True))


def test_sft_checkpoint_is_not_resumed_as_dpo(tiny_model_dir, pairs_file, tmp_path):
    out = tmp_path / "run"
    sft(_cfg(tiny_model_dir, pairs_file, out))
    with pytest.raises(PreftuneError, match="it is a sft run and this is a dpo run"):
        train(_cfg(tiny_model_dir, pairs_file, out, resume=True))


def test_moved_model_folder_is_the_same_model(run, tiny_model_dir, pairs_file, tmp_path):
    moved = tmp_path / "moved-model"
    shutil.copytree(tiny_model_dir, moved)  # copy2 keeps the mtimes, as `mv` or `cp -p` do
    res = train(_cfg(moved, pairs_file, run, resume=True, max_steps=3))
    assert [r["step"] for r in read_metrics(res.output_dir)] == [1, 2, 3]


def test_allowed_changes_resume(run, tiny_model_dir, pairs_file, capsys, tmp_path):
    res = train(_cfg(tiny_model_dir, pairs_file, run, resume=True, max_steps=4, save_steps=2, logging_steps=2,
                     save_total_limit=1, prefix_sharing=False, logits_chunk_size=0, eval_batch_size=3,
                     data_cache_dir=str(tmp_path / "shared_cache")))
    assert "resumed from" in capsys.readouterr().out
    assert [r["step"] for r in read_metrics(res.output_dir)] == [1, 2, 4]


def test_resume_force_continues_and_names_the_differences(run, tiny_model_dir, pairs_file, capsys):
    res = train(_cfg(tiny_model_dir, pairs_file, run, resume=True, resume_force=True, beta=0.2, max_steps=3))
    out = capsys.readouterr().out
    assert "--resume-force: resuming from step-0000002 although beta 0.1 → 0.2" in out
    assert res.steps == 3


def test_checkpoint_without_identity_needs_force(run, tiny_model_dir, pairs_file):
    from preftune.outputs.manifest import write_manifest

    ck = run / "checkpoints" / "step-0000002"
    state = json.loads((ck / "trainer_state.json").read_text())
    del state["identity"]
    (ck / "trainer_state.json").write_text(json.dumps(state))
    (ck / "manifest.json").unlink()
    write_manifest(ck)
    with pytest.raises(PreftuneError, match="records no run identity"):
        train(_cfg(tiny_model_dir, pairs_file, run, resume=True))
    train(_cfg(tiny_model_dir, pairs_file, run, resume=True, resume_force=True, max_steps=3))


def test_from_the_command_line_exit_2(run, tiny_model_dir, pairs_file, capsys):
    from preftune.cli import main

    code = main(["train", "--model", str(tiny_model_dir), "--data", str(pairs_file), "--output-dir", str(run),
                 "--resume", "--beta", "0.5", "--max-length", "64", "--max-prompt-length", "32", "--batch-size", "4",
                 "--save-steps", "1", "--learning-rate", "1e-3", "--progress", "false"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "beta 0.1 → 0.5" in err


def test_allow_list_names_real_settings():
    """Every allow-listed name is a config key (or one of the keys other branches add), so a typo in the list
    cannot silently let a math setting through."""
    assert MAY_CHANGE <= set(TrainConfig.field_names())
