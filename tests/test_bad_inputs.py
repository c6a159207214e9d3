"""Every kind of bad input: one sentence naming the thing, exit status 2, no traceback, nothing written."""

from __future__ import annotations

import json

import pytest
import torch

from preftune import TrainConfig, train
from preftune.cli import main
from preftune.errors import PreftuneError

GOOD = {"prompt": "question: red answer:", "chosen": " yes good", "rejected": " no bad"}


def _train_cli(model, data, out, *extra):
    return main(["train", "--model", str(model), "--data", str(data), "--output-dir", str(out), "--max-steps", "1",
                 "--max-length", "64", "--max-prompt-length", "32", "--progress", "false", *extra])


def _expect(capsys, code, *needles):
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, err
    return err


def _jsonl(path, rows):
    path.write_bytes(b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows))
    return path


@pytest.mark.parametrize("rows, needles", [
    ([GOOD, b'{"prompt": "x", "chosen": ', GOOD], ["line 2", "not valid JSON"]),
    ([GOOD, {"prompt": "p", "chosen": "c"}], ["line 2", "missing field 'rejected'"]),
    ([GOOD, {"prompt": 3, "chosen": "c", "rejected": "r"}], ["line 2", "'prompt' is int"]),
    ([GOOD, b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}'], ["line 2", "UTF-8"]),
    ([GOOD, {"prompt": "x" * 1_000_001, "chosen": "a", "rejected": "b"}], ["line 2", "long"]),
], ids=["bad-json", "missing-field", "wrong-type", "invalid-utf8", "huge-row"])  # empty/identical answers: dropped
# and counted, not refused (tests/data/test_public_files.py)
def test_bad_rows(tmp_path, tiny_model_dir, capsys, rows, needles):
    data = _jsonl(tmp_path / "d.jsonl", rows)
    out = tmp_path / "out"
    _expect(capsys, _train_cli(tiny_model_dir, data, out), *needles, "--skip-invalid")
    assert not out.exists()


def test_skip_invalid_drops_and_trains(tmp_path, tiny_model_dir, capsys):
    data = _jsonl(tmp_path / "d.jsonl", [GOOD] * 4 + [b"not json", {"prompt": "p"}])
    assert _train_cli(tiny_model_dir, data, tmp_path / "out", "--skip-invalid", "--batch-size", "2") == 0
    assert "dropped 2 invalid rows" in capsys.readouterr().out


@pytest.mark.parametrize("content, needle", [
    (b"", "empty"),
    (b"\x00\x01\x02\xff\xfe binary \x00" * 50, "does not look like"),
])
def test_empty_and_binary_files(tmp_path, tiny_model_dir, capsys, content, needle):
    data = tmp_path / "d.jsonl"
    data.write_bytes(content)
    _expect(capsys, _train_cli(tiny_model_dir, data, tmp_path / "out"), needle)
    assert not (tmp_path / "out").exists()


def test_model_folder_without_config(tmp_path, pairs_file, capsys):
    (tmp_path / "m").mkdir()
    _expect(capsys, _train_cli(tmp_path / "m", pairs_file, tmp_path / "out"), "no config.json")


def test_tokenizer_without_eos(tmp_path, pairs_file, capsys):
    from helpers import build_tiny_model
    from transformers import AutoTokenizer

    folder = build_tiny_model(tmp_path / "m")
    tok = AutoTokenizer.from_pretrained(folder)
    tok.eos_token = None
    tok.save_pretrained(folder)
    _expect(capsys, _train_cli(folder, pairs_file, tmp_path / "out"), "no EOS token")


def test_out_of_range_and_unknown_keys(tmp_path, tiny_model_dir, pairs_file, capsys):
    _expect(capsys, _train_cli(tiny_model_dir, pairs_file, tmp_path / "o", "--label-smoothing", "0.7"),
            "label_smoothing must be in [0, 0.5)")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {tiny_model_dir}\ndata: {pairs_file}\noutput_dir: {tmp_path / 'o'}\nbeat: 0.1\n")
    _expect(capsys, main(["train", str(cfg)]), "unknown config key 'beat'", "did you mean 'beta'")
    assert not (tmp_path / "o").exists()


def test_resume_without_checkpoint(tmp_path, tiny_model_dir, pairs_file, capsys):
    _expect(capsys, _train_cli(tiny_model_dir, pairs_file, tmp_path / "o", "--resume"), "found no checkpoint")


class _NaNAt:
    """Wraps forward_logps so that its n-th training call returns NaN log-probs."""

    def __init__(self, real, n):
        self.real, self.n, self.calls = real, n, 0

    def __call__(self, *a, **k):
        out = self.real(*a, **k)
        if torch.is_grad_enabled():
            self.calls += 1
            if self.calls == self.n:
                out.chosen_logps = out.chosen_logps * float("nan")
        return out


def test_nan_loss_stops_naming_step_and_examples(tmp_path, tiny_model_dir, pairs_file, monkeypatch):
    import preftune.logprobs as logprobs

    monkeypatch.setattr(logprobs, "forward_logps", _NaNAt(logprobs.forward_logps, 2))
    cfg = TrainConfig(model=str(tiny_model_dir), data=str(pairs_file), output_dir=str(tmp_path / "o"), max_steps=3,
                      batch_size=4, progress=False, max_length=64, max_prompt_length=32)
    with pytest.raises(PreftuneError, match=r"loss became nan at step 2 on examples \[\d+, \d+, \d+, \d+\]"):
        train(cfg)


def test_nan_loss_skip_option_counts(tmp_path, tiny_model_dir, pairs_file, monkeypatch):
    import preftune.logprobs as logprobs
    from preftune.outputs.metrics import read_metrics

    monkeypatch.setattr(logprobs, "forward_logps", _NaNAt(logprobs.forward_logps, 2))
    cfg = TrainConfig(model=str(tiny_model_dir), data=str(pairs_file), output_dir=str(tmp_path / "o"), max_steps=3,
                      batch_size=4, progress=False, max_length=64, max_prompt_length=32, on_nonfinite="skip")
    res = train(cfg)
    rows = read_metrics(res.output_dir)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[1]["loss"] is None and rows[2]["skipped_steps"] == 1
    assert res.final_dir.is_dir()


@pytest.mark.parametrize("flags, needle", [
    (["--adam-beta1", "2"], "adam_beta1 must be in [0, 1) (got 2)"),
    (["--adam-beta2", "1"], "adam_beta2 must be in [0, 1)"),
    (["--weight-decay", "-1"], "weight_decay must be >= 0 (got -1)"),
    (["--seed", "-1"], "seed must be at least 0 (got -1)"),
    (["--eval-batch-size", "-1"], "eval_batch_size must be at least 0 (got -1)"),
    (["--warmup-steps", "-2"], "warmup_steps must be at least 0"),
    (["--save-total-limit", "-1"], "save_total_limit must be at least 0"),
    (["--max-steps", "1.5"], "max_steps must be a whole number"),
    (["--lora", "maybe"], "lora must be true or false, got 'maybe'"),
    (["--beta", ".nan"], "beta must be a finite number"),
], ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_out_of_range_flags(tmp_path, tiny_model_dir, pairs_file, capsys, flags, needle):
    _expect(capsys, _train_cli(tiny_model_dir, pairs_file, tmp_path / "o", *flags), needle)
    assert not (tmp_path / "o").exists()


def test_yaml_alias_bomb_config(tmp_path, tiny_model_dir, pairs_file, capsys):
    lines = ["l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 9)]
    cfg = tmp_path / "bomb.yaml"
    cfg.write_text("\n".join(lines) + "\nloss: *l8\n")
    _expect(capsys, main(["train", str(cfg)]), "expands to more than 100,000 values")


def test_uncreatable_output_dir(tmp_path, tiny_model_dir, pairs_file, capsys):
    (tmp_path / "file").write_text("x")
    _expect(capsys, _train_cli(tiny_model_dir, pairs_file, tmp_path / "file" / "run"),
            "cannot create output_dir", "is a file, not a folder")


def test_missing_attention_package(tmp_path, tiny_model_dir, pairs_file, capsys):
    try:
        import flash_attn  # noqa: F401
        pytest.skip("flash-attn is installed here")
    except ImportError:
        pass
    _expect(capsys, _train_cli(tiny_model_dir, pairs_file, tmp_path / "o", "--attn-implementation",
                               "flash_attention_2"), "a package it needs is missing")
    assert not (tmp_path / "o").exists()


def test_corrupt_checkpoint_without_intact_one(tmp_path, tiny_model_dir, pairs_file, capsys):
    out = tmp_path / "o"
    assert _train_cli(tiny_model_dir, pairs_file, out, "--save-steps", "1", "--save-total-limit", "1") == 0
    ck = out / "checkpoints" / "step-0000001"
    (ck / "scheduler.pt").write_bytes((ck / "scheduler.pt").read_bytes()[:100])
    capsys.readouterr()
    _expect(capsys, _train_cli(tiny_model_dir, pairs_file, out, "--resume", "--max-steps", "2"),
            "no intact checkpoint", "scheduler.pt has 100 bytes instead of")


def test_lone_surrogate_in_json_string(tmp_path, tiny_model_dir, capsys):
    data = _jsonl(tmp_path / "d.jsonl", [GOOD, b'{"prompt": "a \\ud800 b", "chosen": " yes", "rejected": " no"}'])
    _expect(capsys, _train_cli(tiny_model_dir, data, tmp_path / "o"), "line 2", "surrogate")


def test_eval_of_a_run_checks_the_models_it_recorded(tiny_dpo_run, tiny_model_dir, eval_pairs_file, tmp_path,
                                                     monkeypatch, capsys):
    """`eval RUN/final` takes the run's reference from its config.yaml (absolute paths: the same from any
    directory) and checks the path still holds the model the run loaded (its identity, in the run's mark): a
    copy with its times scores; once that folder holds other weights, one sentence before anything loads. A
    link planted at RUN/eval.json is refused; the Python API given wrong types is one sentence."""
    import shutil

    import yaml
    from safetensors.torch import load_file, save_file

    from preftune.evaluate import run_eval
    from preftune.generate import generate, run_generate

    run, base = tmp_path / "run", tmp_path / "base"
    shutil.copytree(tiny_dpo_run, run)
    shutil.copytree(tiny_model_dir, base)  # (copy2 keeps the times: the same model)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["model"] == str(tiny_model_dir) and cfg["data"].startswith("/")
    (run / "config.yaml").write_text(yaml.safe_dump({**cfg, "model": str(base)}))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    args = ["eval", "--model", str(run / "final"), "--data", str(eval_pairs_file), "--generate", "0",
            "--kl-samples", "0"]
    assert main(args) == 0
    assert f"against {base} (beta 0.1): 48 held-out pairs" in capsys.readouterr().out
    assert json.loads((run / "eval.json").read_text())["reference"] == str(base)
    weights = load_file(str(base / "model.safetensors"))
    save_file({k: v + 1 for k, v in weights.items()}, str(base / "model.safetensors"))
    _expect(capsys, main(args), f"the run in {run} was trained with {base} as its model, but that path now holds "
            "another model (model.safetensors changed); pass --reference")
    (run / "eval.json").unlink()
    (run / "eval.json").symlink_to(tmp_path / "notes.txt")
    _expect(capsys, main([*args, "--reference", str(tiny_model_dir)]), "eval.json is a symbolic link")
    assert not (tmp_path / "notes.txt").exists()
    for call, needle in ((lambda: run_eval(5, str(eval_pairs_file)), "model must be a path"),
                         (lambda: generate(None, None, ["hi"]), "generate takes a loaded model"),
                         (lambda: run_generate(str(base), prompts="hi"), "prompts must be a list")):
        with pytest.raises(PreftuneError, match=needle):
            call()
