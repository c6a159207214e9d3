"""Checkpoints: kill -9 at a random step and resume = the uninterrupted run; SIGTERM saves; atomic writes."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from preftune.outputs.checkpoint import list_checkpoints, save_checkpoint

TIMING = {"pairs_per_s", "tokens_per_s"}


KILL_AFTER_LINE = """
import os, signal, sys
from preftune.callbacks import Callback
from preftune.cli import main

class Die(Callback):
    def on_log(self, state, row):  # right after the metrics line is written, before the step's checkpoint
        if row["split"] == "train" and row["step"] >= int(os.environ["KILL_AFTER"]):
            os.kill(os.getpid(), signal.SIGKILL)

sys.exit(main(sys.argv[1:], callbacks=[Die()]))
"""


def _argv(model, data, out, *extra):
    return [sys.executable, "-m", "preftune", "train", "--model", str(model), "--data", str(data),
            "--output-dir", str(out), "--max-steps", "8", "--batch-size", "4", "--learning-rate", "1e-3",
            "--max-length", "64", "--max-prompt-length", "32", "--save-steps", "1", "--save-total-limit", "2",
            "--progress", "false", "--seed", "5", "--loss", "sigmoid+bco_pair", *extra]


def _metrics(out):
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def _wait_for_lines(path, n, proc, timeout=240):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if path.is_file() and len(path.read_text().splitlines()) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(proc.stderr.read())
        time.sleep(0.05)
    raise AssertionError("training made no progress")


def test_sigkill_then_resume_equals_uninterrupted(tiny_model_dir, pairs_file, tmp_path):
    """bco_pair is in the loss so the running reward shift must be restored too, not only weights/optimizer."""
    full = tmp_path / "full"
    subprocess.run(_argv(tiny_model_dir, pairs_file, full), check=True, capture_output=True, timeout=300)

    killed = tmp_path / "killed"
    # The process kills itself right after writing metrics line `kill_after` (before that step's checkpoint),
    # so the kill point is exact, not a race with a fast run; seeded, and printed on failure for replay.
    kill_after = random.Random(20261130).randint(2, 6)
    argv = _argv(tiny_model_dir, pairs_file, killed)
    proc = subprocess.run([argv[0], "-c", KILL_AFTER_LINE, *argv[3:]], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "KILL_AFTER": str(kill_after)})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not (killed / "final").exists()
    subprocess.run(_argv(tiny_model_dir, pairs_file, killed, "--resume"), check=True, capture_output=True,
                   timeout=300)

    assert _metrics(killed) == _metrics(full), f"killed after {kill_after} logged steps"
    steps = [r["step"] for r in _metrics(killed)]
    assert steps == list(range(1, 9))
    a = load_file(str(full / "final" / "model.safetensors"))
    b = load_file(str(killed / "final" / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0)
    assert len(list_checkpoints(killed)) == 2  # save_total_limit


def test_second_run_is_refused_and_sigterm_exits_resumable(tiny_model_dir, pairs_file, tmp_path, capsys):
    """While a run trains, a second run on its folder (--overwrite or --resume) is refused naming the first's
    process, and leaves its files alone; SIGTERM then checkpoints and exits 75 (EX_TEMPFAIL: resumable), and the
    lock is gone, so the same command (--resume auto: start afresh or continue) continues where it stopped."""
    from preftune.cli import EXIT_RESUMABLE, main

    out = tmp_path / "run"
    argv = _argv(tiny_model_dir, pairs_file, out, "--resume", "auto")
    argv[argv.index("--save-steps") + 1] = "0"
    argv[argv.index("--max-steps") + 1] = "400"
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_lines(out / "metrics.jsonl", 2, proc)
    for flag in ("--overwrite", "--resume"):
        assert main(argv[3:] + [flag]) == 2
        err = capsys.readouterr().err
        assert f"is in use by another preftune run (process {proc.pid} on this machine" in err, err
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_RESUMABLE == 75, stderr
    assert "(a checkpoint is saved); resumable: run the same command with --resume" in stderr
    assert "model in" not in stdout and not (out / "final").exists()  # no claim of a final model it never wrote
    (ckpt,) = list_checkpoints(out)
    steps = [r["step"] for r in _metrics(out)]
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == len(steps)
    assert steps == list(range(1, len(steps) + 1))  # one run's lines only, none interleaved
    assert not (out / ".preftune.lock").exists()
    argv[argv.index("--max-steps") + 1] = str(len(steps) + 2)  # the requeued command, shortened for the test
    assert main(argv[3:]) == 0
    assert [r["step"] for r in _metrics(out)] == list(range(1, len(steps) + 3))


def test_full_disk_keeps_previous_checkpoint(tmp_path, monkeypatch):
    import errno

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    kw = dict(model=model, optimizer=opt, scheduler=sched, trainer_state={}, reference_cache=None, keep=3)
    first = save_checkpoint(tmp_path, 1, **kw)

    def full_disk(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    # The raw error goes up (the recipe's RunDir.saving words it: tests/outputs/test_disk_full.py), and only
    # after the half-written folder is gone.
    from preftune.outputs.run_dir import write_failure

    with pytest.raises(BaseException) as failure:  # DCP wraps it in a CheckpointException (a BaseException)
        save_checkpoint(tmp_path, 2, **kw)
    assert write_failure(failure.value, tmp_path) == ("the disk filled", "free space")
    assert list_checkpoints(tmp_path) == [first]
    assert not any(p.name.startswith(".tmp") for p in (tmp_path / "checkpoints").iterdir())
    assert os.path.isfile(first / "state" / ".metadata") and os.path.isfile(first / "trainer_state.json")


def test_a_signal_in_the_final_evaluation_or_in_setup_keeps_the_weights(tiny_model_dir, pairs_file, eval_pairs_file,
                                                                         tmp_path, monkeypatch, capsys):
    """SIGTERM during the final evaluation with --save-steps 0 (no checkpoint to fall back on): the evaluation
    stops, final/ is written whole, exit 75, and no eval row claims an evaluation that did not finish; the same
    command with --resume auto then has nothing to do (exit 0, the run folder unchanged, final/ kept). SIGINT
    while the data is being tokenized: exit 75 at once, no run folder made, nothing left in the temporary folder."""
    import tempfile

    import preftune.data.splits as splits
    from preftune import recipe
    from preftune.cli import main

    real_evaluate, real_build = recipe.Recipe.evaluate, splits.build_entry

    def evaluate(self, stop):
        if self.state.step == self.state.total_steps:
            signal.raise_signal(signal.SIGTERM)
        return real_evaluate(self, stop)

    monkeypatch.setattr(recipe.Recipe, "evaluate", evaluate)
    out = tmp_path / "run"
    args = _argv(tiny_model_dir, pairs_file, out, "--eval-data", str(eval_pairs_file))[3:]
    args[args.index("--save-steps") + 1], args[args.index("--max-steps") + 1] = "0", "2"
    assert main(args) == 75
    assert "after step 2 (final/ is written but not evaluated); resumable" in capsys.readouterr().err
    assert (out / "final" / "model.safetensors").is_file() and not list_checkpoints(out)
    assert [(r["step"], r["split"]) for r in _metrics(out)] == [(1, "train"), (2, "train")]
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".preftune.lock"}
    assert main(args + ["--resume", "auto"]) == 0
    assert f"output_dir {out} holds a finished run (final/ of step 2): nothing to resume" in capsys.readouterr().out
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".preftune.lock"} == before

    def build(*a, **k):
        signal.raise_signal(signal.SIGINT)
        return real_build(*a, **k)

    monkeypatch.setattr(splits, "build_entry", build)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    args[args.index("--output-dir") + 1] = str(tmp_path / "run2")
    assert main(args) == 75
    assert "stopped by SIGINT during setup, before the first step; nothing was trained" in capsys.readouterr().err
    assert not (tmp_path / "run2").exists() and list((tmp_path / "tmp").iterdir()) == []
