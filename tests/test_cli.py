"""The CLI: flags named after config keys, and bad input as one sentence with exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from preftune.cli import build_parser, config_from_args, main


def _run(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "preftune", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_flags_override_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: m\ndata: d.jsonl\noutput_dir: o\nbeta: 0.2\nlora: false\n")
    args = build_parser().parse_args(["train", str(p), "--beta", "0.5", "--max-steps", "7", "--lora",
                                      "--loss", "[sigmoid, ipo]"])
    cfg = config_from_args(args)
    assert (cfg.beta, cfg.max_steps, cfg.lora, cfg.loss) == (0.5, 7, True, ["sigmoid", "ipo"])


@pytest.mark.parametrize("argv, needle", [
    (["train", "--model", "m", "--learning-rte", "1"], "did you mean --learning-rate"),
    (["train", "--beta", "0"], "beta must be > 0"),
    (["train", "missing.yaml"], "config file missing.yaml does not exist"),
])
def test_bad_input_exit_2_one_sentence(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and err.count("\n") == 1


def test_missing_model_and_data_files(tmp_path, pairs_file, tiny_model_dir, capsys):
    assert main(["train", "--model", str(tmp_path / "nope"), "--data", str(pairs_file),
                 "--output-dir", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(tmp_path / "none.jsonl"),
                 "--output-dir", str(tmp_path / "o2")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "o2" / "config.yaml").exists()


def test_pickle_only_model_folder_is_refused(tmp_path, pairs_file, capsys):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    assert main(["train", "--model", str(folder), "--data", str(pairs_file), "--output-dir", str(tmp_path / "o")]) == 2
    assert "--allow-pickle" in capsys.readouterr().err


def test_non_empty_output_dir_is_refused_and_kept(tmp_path, tiny_model_dir, pairs_file, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(pairs_file), "--output-dir", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine"


def test_train_from_the_command_line(tmp_path, tiny_model_dir, pairs_file):
    out = tmp_path / "run"
    r = _run("train", "--model", str(tiny_model_dir), "--data", str(pairs_file), "--output-dir", str(out),
             "--max-steps", "2", "--batch-size", "4", "--learning-rate", "1e-4", "--max-length", "64",
             "--max-prompt-length", "32", "--progress", "false")
    assert r.returncode == 0, r.stderr
    assert "loaded 64 pairs (standard)" in r.stdout
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2]
    assert (out / "final" / "model.safetensors").is_file()
