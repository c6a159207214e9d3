"""The CLI: flags named after config keys, and bad input as one sentence with exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

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


@pytest.mark.parametrize("argv, needle", [
    (["inspect", "d.jsonl", "--batch-size", "-2"], "batch_size must be at least 1 (got -2)."),
    (["inspect", "d.jsonl", "--batch-size", "0"], "batch_size must be at least 1 (got 0)."),
    (["generate", "--model", "m", "--prompt", "x", "--batch-size", "0"], "batch_size must be at least 1 (got 0)."),
    (["generate", "--model", "m", "--prompt", "x", "--batch-size", "-1"], "batch_size must be at least 1 (got -1)."),
    (["eval", "--model", "m", "--data", "d", "--batch-size", "0"], "batch_size must be at least 1 (got 0)."),
    (["eval", "--model", "m", "--data", "d", "--max-length", "0"], "max_length must be at least 2 (got 0)."),
    (["eval", "--model", "m", "--data", "d", "--max-length", "1"], "max_length must be at least 2 (got 1)."),
    (["eval", "--model", "m", "--data", "d", "--beta", "nan"], "beta must be a finite number, got nan."),
    (["eval", "--model", "m", "--data", "d", "--beta", "0"], "beta must be > 0 (got 0)"),
    (["generate", "--model", "m", "--prompt", "x", "--temperature", "nan"], "temperature must be a finite number"),
    (["generate", "--model", "m", "--prompt", "x", "--top-p", "0"], "top_p must be in (0, 1] (got 0)."),
    (["generate", "--model", "m", "--prompt", "x", "--seed", "1e23"], "seed must be at most 4294967295"),
    (["generate", "--model", "m", "--prompt", "x", "--device", "banana"], "device must name a device such as cpu"),
    (["generate", "--model", "m"], "give the prompts with --prompt"),
    (["plan", "--model", "m", "--gpus", "0"], "gpus must be at least 1 (got 0)."),
    (["plan", "--model", "m", "--seq-len", "1"], "seq_len must be at least 2 (got 1)."),
    (["report", "r", "--loss", "x"], "unknown flag --loss for `preftune report`; see `preftune report --help`"),
    (["eval", "--model", "m", "--data", "d", "--bta", "1"], "unknown flag --bta for `preftune eval`; did you mean --beta?"),
])
def test_every_command_checks_its_numbers_like_train(argv, needle, capsys):
    """The options of every command come from the same schema as train's: one sentence, exit status 2, before
    any model or data file is looked at (none of those named here exists)."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and err.count("\n") == 1, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible here")
def test_device_cuda_without_a_gpu_is_one_sentence(capsys):
    assert main(["generate", "--model", "m", "--prompt", "x", "--device", "cuda"]) == 2
    assert "asks for a GPU but this torch sees none" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["train", "inspect", "eval", "generate", "plan", "report", "push"])
def test_help_lists_every_option_of_the_command(command, capsys):
    from preftune.cli import COMMANDS
    from preftune.options import options_of

    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    for name, _, opt in options_of(COMMANDS[command][0]):
        assert ("--" + name.replace("_", "-") in out or name.upper() in out) and opt.help.split()[0] in out
