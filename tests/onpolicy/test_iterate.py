"""`preftune iterate` end to end on the tiny model: every round's DPO starts at ln 2 (its reference is the round's
start), the table is what the round's files say (judged again here), a run SIGKILLed during round 2's pairs and
again during its training continues to the same rounds and weights as an uninterrupted one, a run forced to
collapse is rolled back, and bad input is one sentence."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from preftune.cli import main
from preftune.judging import win_rate
from preftune.onpolicy import IterateConfig, iterate

JUDGE = """import os, signal

def score(prompt, answer):
    if os.path.exists(os.environ.get("KILL_IF_EXISTS", "/nonexistent")):
        os.kill(os.getpid(), signal.SIGKILL)
    words = answer.split()
    return float(len(set(words))) - 0.1 * len(words)
"""


def _score(answer: str) -> float:
    words = answer.split()
    return float(len(set(words))) - 0.1 * len(words)


# Plain DPO (no NLL term: the step-1 loss is then DPO's alone); a checkpoint at step 2 of each round's 3 steps.
SETTINGS = dict(rounds=2, max_new_tokens=6, max_steps=3, batch_size=4, max_length=64, max_prompt_length=32,
                eval_fraction=0.25, sft_weight=0.0, beta=0.1, learning_rate=1e-3, save_steps=2, logging_steps=1,
                sample_batch_size=8, progress=False, device="cpu")
# A process that runs iterate with a training callback that SIGKILLs it at round 2's step 3 when asked to.
SCRIPT = """import json, os, signal, sys
from preftune.callbacks import Callback
from preftune.onpolicy import iterate

class Kill(Callback):
    def on_step_end(self, state):
        if os.environ.get("KILL_AT_STEP") == f"{state.output_dir.parent.name}:{state.step}":
            os.kill(os.getpid(), signal.SIGKILL)

iterate(**json.loads(sys.argv[1]), callbacks=[Kill()], say=lambda _: None)
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from helpers import make_pairs as example_pairs

    folder = tmp_path_factory.mktemp("iterate")
    (folder / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p["prompt"]}) + "\n"
                                                  for p in example_pairs(24, seed=7)))
    (folder / "judge.py").write_text(JUDGE)
    return folder


def _options(files: Path, model: Path, out: Path, **changes) -> dict:
    return {**SETTINGS, "model": str(model), "prompts": str(files / "prompts.jsonl"),
            "judge": f"{files / 'judge.py'}:score", "output_dir": str(out), **changes}


def _snapshot(*roots: Path) -> dict[Path, tuple[int, int]]:
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for root in roots for p in root.rglob("*")
            if "__pycache__" not in p.parts}  # (Python's own cache of the imported judge.py)


@pytest.fixture(scope="module")
def whole(files, tiny_model_dir):
    """An uninterrupted two-round run; `outside`: what it changed beside its output folder (the prompts' and the
    judge's folder, the model's)."""
    before = _snapshot(files, tiny_model_dir)
    result = iterate(**_options(files, tiny_model_dir, files / "whole"), say=lambda _: None)
    after = _snapshot(files, tiny_model_dir)
    result.outside = sorted(str(p) for p in after.keys() | before.keys() if before.get(p) != after.get(p)
                            and result.output_dir not in (p, *p.parents))
    return result


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_every_round_starts_at_ln2_and_the_table_is_what_its_files_say(whole, files, tiny_model_dir):
    out = whole.output_dir
    assert whole.model == str(out / "round-2" / "train" / "final") and whole.stopped is None
    assert whole.outside == []  # nothing written outside its folder (issue 26)
    assert json.loads((out / ".preftune-run.json").read_text())["command"] == "iterate"
    for r in (1, 2):
        first = next(m for m in _metrics(out / f"round-{r}" / "train") if m["split"] == "train")
        # The reference is the round's start, so before the first update every margin is 0: −log σ(0) = ln 2.
        assert first["step"] == 1 and first["loss"] == pytest.approx(math.log(2), abs=1e-5)
    start_of_2 = json.loads((out / "round-2" / "pairs.jsonl").read_text().splitlines()[0])["source"]
    assert start_of_2["model"] == str(out / "round-1" / "train" / "final") and start_of_2["seed"] == 1
    table = json.loads((out / "rounds.json").read_text())
    assert [row["round"] for row in table["rounds"]] == [0, 1, 2] and table["result"] == whole.model
    evals = [json.loads((out / f"round-{r}" / "eval.json").read_text()) for r in range(3)]
    held = [json.loads(x)["prompt"] for x in (out / "prompts" / "eval.jsonl").read_text().splitlines()]
    assert len(held) == 6  # ceil(0.25 × 24), never trained on
    assert not set(held) & {json.loads(x)["prompt"] for x in (out / "prompts" / "train.jsonl").read_text().splitlines()}
    for ev in evals:  # every held-out answer judged again here
        assert ev["greedy"]["scores"] == [_score(t) for t in ev["greedy"]["texts"]]
    for r, row in enumerate(table["rounds"][1:], 1):
        def verdicts(mine, theirs):
            return ["model" if a > b else "reference" if a < b else "tie" for a, b in zip(mine, theirs)]

        assert row["vs_first"] == {k: v for k, v in win_rate(verdicts(evals[r]["greedy"]["scores"],
                                                                      evals[0]["greedy"]["scores"])).items()
                                   if k != "interval"}
        assert row["vs_previous"]["wins"] == sum(v == "model" for v in verdicts(evals[r]["greedy"]["scores"],
                                                                                 evals[r - 1]["greedy"]["scores"]))
        assert row["score_mean"] == pytest.approx(sum(evals[r]["greedy"]["scores"]) / 6)
        assert row["steps"] == 3 and row["status"] == "kept"
    assert evals[1]["kl_first"] == evals[1]["kl_start"]  # round 1 starts from the first model
    page = (out / "report" / "report.html").read_text()
    assert "win vs previous [95%]" in page and all(f"<td>{c}</td>" in page for c in table["table"]["rows"][2][:4])


def _same(a: Path, b: Path, text: str) -> str:
    return text.replace(str(a), "OUT").replace(str(b), "OUT")


def test_a_run_killed_during_pairs_and_during_training_continues_to_the_same_result(whole, files, tiny_model_dir):
    """SIGKILL once the first batch of round 2's pairs is written, then (resumed) at round 2's step 3, after the
    step-2 checkpoint; the third run finishes in this process. Rounds, evaluations and weights equal the
    uninterrupted run's (the folder's name aside)."""
    out = files / "cut"
    env = {**os.environ, "KILL_IF_EXISTS": str(out / "round-2" / "pairs.state" / "done-0.jsonl")}
    options = _options(files, tiny_model_dir, out)
    first = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(options)], env=env, capture_output=True,
                           text=True)
    assert first.returncode == -9, first.stderr[-2000:]
    assert (out / "round-1" / "eval.json").is_file() and not (out / "round-2" / "pairs.summary.json").exists()
    env = {**os.environ, "KILL_AT_STEP": "round-2:3"}
    second = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps({**options, "resume": True})], env=env,
                            capture_output=True, text=True)
    assert second.returncode == -9, second.stderr[-2000:]
    assert (out / "round-2" / "train" / "checkpoints").is_dir() and not (out / "round-2" / "train" / "final").exists()
    result = iterate(**{**options, "resume": True}, say=lambda _: None)
    assert result.model == str(out / "round-2" / "train" / "final")

    def rounds(folder: Path) -> list[dict]:
        rows = json.loads(_same(folder, folder, (folder / "rounds.json").read_text().replace(str(folder), "OUT")))
        return [{k: v for k, v in row.items() if k != "seconds"} for row in rows["rounds"]]

    assert rounds(out) == rounds(whole.output_dir)
    for r in (0, 1, 2):
        name = f"round-{r}/eval.json"
        assert (_same(out, out, (out / name).read_text()) == _same(whole.output_dir, whole.output_dir,
                                                                      (whole.output_dir / name).read_text()))
    for r in (1, 2):
        ours = load_file(out / f"round-{r}" / "train" / "final" / "model.safetensors")
        theirs = load_file(whole.output_dir / f"round-{r}" / "train" / "final" / "model.safetensors")
        for k in theirs:
            torch.testing.assert_close(ours[k], theirs[k], rtol=1e-6, atol=1e-7)


def test_a_round_forced_to_collapse_is_rolled_back(files, tiny_model_dir, capsys):
    """A learning rate of 3 wrecks the tiny model in 4 steps (from the command line): the round is rolled back
    with one line saying why, the first model stays the result and round 2 never starts."""
    out = files / "collapse"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in _options(files, tiny_model_dir, out, learning_rate=3.0,
                                                                   max_steps=4, eval_fraction=0.5).items()]
    assert main(["iterate", *flags]) == 0
    table = json.loads((out / "rounds.json").read_text())
    assert table["result"] == str(tiny_model_dir) and not (out / "round-2").exists()
    assert table["stopped"].startswith("round 1 collapsed: ") and table["stopped"].endswith(
        "; rolled back, the first model is the result")
    row = table["rounds"][1]
    assert row["status"] == "collapsed: rolled back"
    assert "judged" in row["signals"] or {"displacement", "kl"} <= set(row["signals"])
    assert f"stopped: {table['stopped']}\n" in capsys.readouterr().out


@pytest.mark.parametrize(("flags", "sentence"), [
    (["--samples", "1"], "samples must be at least 2 (got 1); a pair needs two answers to compare."),
    (["--rounds", "0"], "rounds must be at least 1 (got 0); a run is at least one round."),
    (["--judge", ""], "pass one judge: --judge"),
    (["--eval-fraction", "0"], "the evaluation after each round needs held-out prompts; pass --eval-prompts"),
    (["--lora", "true"], "a LoRA run needs --merge-lora true"),
    (["--reference-mode", "fixd"], "reference_mode must be one of round, fixed; got 'fixd' (did you mean 'fixed'?)."),
    (["--max-prompt-length", "64"], "max_prompt_length (64) must be smaller than max_length (64)"),
    (["--prompts", "missing.jsonl"], "missing.jsonl"),
    (["--judge", "nowhere.py:score"], "nowhere.py"),
])
def test_bad_input_is_one_sentence_and_nothing_is_written(flags, sentence, files, tmp_path, capsys):
    args = ["iterate", "--model", str(files), "--prompts", str(files / "prompts.jsonl"), "--judge",
            f"{files / 'judge.py'}:score", "--output-dir", str(tmp_path / "run"), "--max-length", "64",
            "--max-prompt-length", "32", *flags]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert sentence in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_an_existing_run_needs_resume_and_the_same_settings(whole, files, tiny_model_dir):
    options = _options(files, tiny_model_dir, whole.output_dir)
    with pytest.raises(Exception, match="holds a preftune iterate run; pass --resume to continue it"):
        IterateConfig(**options) and iterate(**options, say=lambda _: None)
    with pytest.raises(Exception, match=r"was made with other settings \(beta 0.1 → 0.2\); resume with the same"):
        iterate(**{**options, "beta": 0.2, "resume": True}, say=lambda _: None)
