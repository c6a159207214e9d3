"""Online DPO (`preftune train --online`) on the tiny model: each step's pairs are sampled from the policy of that
step and judged (step 1's drawn and judged again here, their log-probs matching what was logged), the loss
starts at ln 2 and stays finite, a run stopped by SIGTERM resumes to the same weights, and bad input is one
sentence."""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from preftune import TrainConfig, train
from preftune.callbacks import Callback
from preftune.cli import main
from preftune.data.batching import micro_batches
from preftune.data.tokenize import TokenizedPair
from preftune.generate import Sampling, encode_prompt, load_model_for_generation, sample_completions
from preftune.scoring import score_ids

JUDGE = """def score(prompt, answer):
    return float(sum(map(ord, answer)) % 101)
"""


def _score(answer: str) -> float:
    return float(sum(map(ord, answer)) % 101)


SETTINGS = dict(online=True, max_steps=4, batch_size=4, max_length=64, max_prompt_length=32, max_new_tokens=8,
                learning_rate=1e-3, warmup_steps=0, beta=0.1, logging_steps=1, save_steps=2, progress=False, seed=3)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from helpers import make_pairs as example_pairs

    folder = tmp_path_factory.mktemp("online")
    (folder / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p["prompt"]}) + "\n"
                                                  for p in example_pairs(12, seed=5)))
    (folder / "judge.py").write_text(JUDGE)
    return folder


def _cfg(files: Path, model: Path, out: Path, **kw) -> TrainConfig:
    return TrainConfig(model=str(model), prompts=str(files / "prompts.jsonl"), judge=f"{files / 'judge.py'}:score",
                       output_dir=str(out), **{**SETTINGS, **kw})


@pytest.fixture(scope="module")
def whole(files, tiny_model_dir):
    return train(_cfg(files, tiny_model_dir, files / "whole"))


def _rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_each_step_trains_on_pairs_sampled_and_judged_then(whole, files, tiny_model_dir):
    rows = _rows(whole.output_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in rows)
    assert all(r["online/pairs"] >= 1 and r["online/pairs"] + r["online/ties"] <= 4 for r in rows)
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # the reference is the starting model
    assert (whole.output_dir / "config.yaml").read_text().count("reference: copy") == 1  # auto: scored live
    # Step 1 again, by hand: its 4 prompts (the batch order over the prompts), 2 answers each from the starting
    # model (streams keyed by step 0 × 12 prompts + the prompt), judged, best over worst, ties dropped.
    model, tok = load_model_for_generation(str(tiny_model_dir), device="cpu")
    prompts = [json.loads(x)["prompt"] for x in (files / "prompts.jsonl").read_text().splitlines()]
    ids = [encode_prompt(tok, p) for p in prompts]
    order = micro_batches([TokenizedPair(i, [], [], n) for n, i in enumerate(ids)], batch_size=4, accumulation=1,
                          seed=3, epoch=0, group_by_length=True)
    step1 = [i for m in order[0] for i in m]
    drawn = sample_completions(model, tok, [ids[i] for i in step1], samples=2, keys=step1,
                               sampling=Sampling(max_new_tokens=8, temperature=0.9, seed=3))
    chosen, prompt_ids = [], []
    for i, (a, b) in zip(step1, drawn):
        sa, sb = _score(a.text), _score(b.text)
        if a.text != b.text and a.text.strip() and b.text.strip() and sa != sb:
            chosen.append((a if sa > sb else b).ids)
            prompt_ids.append(ids[i])
    assert rows[0]["online/pairs"] == len(chosen)
    logps, _ = score_ids(model, prompt_ids, chosen, pad_id=tok.pad_token_id)
    assert rows[0]["logps/chosen"] == pytest.approx(float(logps.mean()), abs=1e-4)


def test_a_stopped_online_run_resumes_to_the_same_weights(whole, files, tiny_model_dir):
    """SIGTERM during step 3: the run checkpoints at step 3 and stops; resumed (from the command line), it samples
    step 4's pairs from the same weights with the same streams and ends where the uninterrupted run did."""
    class Stop(Callback):
        def on_step_end(self, state):
            if state.step == 3:
                signal.raise_signal(signal.SIGTERM)

    out = files / "cut"
    first = train(_cfg(files, tiny_model_dir, out), callbacks=[Stop()])
    assert first.interrupted and first.steps == 3
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in _cfg(files, tiny_model_dir, out).to_dict().items()
             if k in {*SETTINGS, "model", "prompts", "judge", "output_dir"}]
    assert main(["train", *flags, "--resume"]) == 0  # the command line, resumed
    timing = ("pairs_per_s", "tokens_per_s", "online/sample_s", "online/judge_s")
    assert [{k: v for k, v in r.items() if k not in timing} for r in _rows(out)] == \
        [{k: v for k, v in r.items() if k not in timing} for r in _rows(whole.output_dir)]
    ours, theirs = load_file(out / "final" / "model.safetensors"), load_file(whole.final_dir / "model.safetensors")
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(("flags", "sentence"), [
    (["--reference", "precomputed"], "an --online run's pairs are new every step, so its reference is scored live"),
    (["--judge", ""], "--online needs one judge"),
    (["--data", "pairs.jsonl"], "--online trains on pairs it samples and judges every step; pass --prompts, not"),
    (["--max-new-tokens", "40"], "--max-new-tokens 40 does not fit after a prompt of max_prompt_length 32"),
    (["--online", "false"], "--prompts and --judge are for online DPO; add --online"),
    (["--temperature", "0"], "temperature must be > 0 (got 0); two greedy answers are one."),
])
def test_bad_input_is_one_sentence(flags, sentence, files, tmp_path, capsys):
    args = ["train", "--online", "--model", str(files), "--prompts", str(files / "prompts.jsonl"), "--judge",
            f"{files / 'judge.py'}:score", "--output-dir", str(tmp_path / "run"), "--max-length", "64",
            "--max-prompt-length", "32", "--max-new-tokens", "8", *flags]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert sentence in err and err.count("\n") == 1 and not (tmp_path / "run").exists()


def test_sft_has_no_online_mode(files, tiny_model_dir, tmp_path, capsys):
    assert main(["sft", "--online", "--model", str(tiny_model_dir), "--prompts", str(files / "prompts.jsonl"),
                 "--judge", f"{files / 'judge.py'}:score", "--output-dir", str(tmp_path / "run"), "--max-length",
                 "64", "--max-prompt-length", "32", "--max-new-tokens", "8", "--progress", "false"]) == 2
    assert "it is an option of `preftune train`, not sft." in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
