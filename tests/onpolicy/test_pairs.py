"""`preftune pairs` end to end on the tiny model: rows that train reads whose scores and choices are worked out
again here; a run stopped by a failing judge continues to the same bytes without judging a prompt twice,
whatever its batch size, and so does a SIGKILLed process of two, which together write the file one process
writes; bad input."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from preftune.cli import main
from preftune.data.load import load_records
from preftune.data.render import render_texts
from preftune.errors import PreftuneError
from preftune.generate import (
    Sampling,
    encode_prompt,
    load_model_for_generation,
    prompt_text,
    sample_completions,
)
from preftune.onpolicy import PairsConfig, make_pairs
from preftune.onpolicy.store import PairsStore

JUDGE = """import os, signal
CALLS = 0

def score(prompt, answer):
    global CALLS
    CALLS += 1
    if CALLS == int(os.environ.get("PAIRS_KILL_AT", "0")):
        os.kill(os.getpid(), signal.SIGKILL)
    return float(len(set(answer.split())) % 3)
"""
# 2 prompts a batch; 3 tokens from the 2 likeliest at each step, so that some answers repeat and some scores tie
SETTINGS = dict(samples=4, max_new_tokens=3, top_k=2, batch_size=8, device="cpu", progress=False)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from helpers import make_pairs as example_pairs

    folder = tmp_path_factory.mktemp("pairs")
    rows = [{"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]} for p in example_pairs(12, seed=7)]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows + rows[:2]))  # 12 distinct prompts
    (folder / "judge.py").write_text(JUDGE)
    return folder


def _cfg(files: Path, out: Path, **kw) -> PairsConfig:
    return PairsConfig(prompts=str(files / "train.jsonl"), judge=f"{files / 'judge.py'}:score", output=str(out),
                       **{**SETTINGS, **kw})


@pytest.fixture(scope="module")
def reference(files, tiny_model_dir):
    """An uninterrupted one-process run."""
    result = make_pairs(_cfg(files, files / "ref" / "pairs.jsonl", model=str(tiny_model_dir)), say=lambda _: None)
    return result


def _score(answer: str) -> float:
    return float(len(set(answer.split())) % 3)


def test_rows_are_what_train_reads_and_are_recomputed_here(reference, tiny_model_dir):
    rows = [json.loads(x) for x in reference.output.read_text().splitlines()]
    loaded = load_records(str(reference.output))
    assert loaded.format == "standard" and len(loaded.records) == len(rows) == reference.rows
    # Every prompt's four answers drawn again (streams keyed by the prompt's index), judged here.
    model, tok = load_model_for_generation(str(tiny_model_dir), device="cpu")
    prompts = list(dict.fromkeys(r["prompt"] for r in load_records(str(reference.output.parent.parent / "train.jsonl")).records))
    answers = sample_completions(model, tok, [encode_prompt(tok, p) for p in prompts], samples=4,
                                 sampling=Sampling(max_new_tokens=3, top_k=2, seed=0))
    expected, ties, distinct = [], 0, 0
    for i, (p, drawn) in enumerate(zip(prompts, answers)):
        texts = list(dict.fromkeys(a.text for a in drawn if a.text.strip()))
        distinct += len(texts)
        scores = [_score(t) for t in texts]
        best, worst = scores.index(max(scores)), scores.index(min(scores))
        if len(texts) > 1 and scores[best] == scores[worst]:
            ties += 1
        elif len(texts) > 1:
            expected.append((i, p, texts[best], texts[worst], scores[best] - scores[worst]))
    assert [(r["source"]["prompt_index"], r["prompt"], r["chosen"], r["rejected"], r["gap"]) for r in rows] == expected
    for r in rows:
        assert (r["score_chosen"], r["score_rejected"]) == (_score(r["chosen"]), _score(r["rejected"]))
        s = r["source"]
        assert s["seed"] == 0 and s["judge"].endswith("judge.py:score") and s["prompt_where"].endswith(
            f"train.jsonl line {s['prompt_index'] + 1}")
        assert 0 <= s["chosen_sample"] < 4 and s["chosen_sample"] != s["rejected_sample"]
    summary = json.loads((reference.output.parent / "pairs.summary.json").read_text())
    assert summary == reference.summary
    assert (summary["prompts"], summary["prompts_repeated_in_file"], summary["samples"]) == (12, 2, 48)
    assert summary["pairs"] == len(rows) and summary["dropped"]["ties"] == ties > 0
    assert summary["identical_answers_collapsed"] == 48 - distinct > 0
    assert summary["prompts_with_pairs"] + ties + summary["dropped"]["prompts_with_one_distinct_answer"] == 12
    assert summary["gap"]["count"] == len(rows) and summary["gap"]["max"] == max(r["gap"] for r in rows)
    assert summary["answers_cut"] == sum(not a.stopped for drawn in answers for a in drawn)


CALLS = {"n": 0, "fail_at": 0}


def flaky(prompt, answer):
    CALLS["n"] += 1
    if CALLS["n"] == CALLS["fail_at"]:
        raise RuntimeError("judge server went away")
    return float(len(set(answer.split())) % 3)


def test_a_failed_run_continues_to_the_same_rows_without_judging_twice(files, tiny_model_dir, tmp_path):
    """The judge fails at its 13th call (in the second or third batch); the rerun, with another batch size,
    judges only the prompts not done, and the output equals an uninterrupted run's byte for byte."""
    def cfg(out, **kw):
        return _cfg(files, out, model=str(tiny_model_dir), **kw)

    CALLS.update(n=0, fail_at=0)
    whole = make_pairs(cfg(tmp_path / "whole.jsonl"), judge=flaky, say=lambda _: None)
    total = CALLS["n"]
    CALLS.update(n=0, fail_at=13)
    with pytest.raises(PreftuneError, match="raised RuntimeError: judge server went away on the prompt at .*"
                                            "train.jsonl line [0-9]+"):
        make_pairs(cfg(tmp_path / "cut.jsonl"), judge=flaky, say=lambda _: None)
    store = PairsStore(tmp_path / "cut.jsonl")
    done = store.done()
    assert 0 < len(done) < 12 and (tmp_path / "cut.jsonl").read_text().count("\n") == sum(
        len(d["pairs"]) for d in done.values())
    judged_before = sum(d["u"] for d in done.values() if d["u"] > 1)
    CALLS.update(n=0, fail_at=0)
    make_pairs(cfg(tmp_path / "cut.jsonl", batch_size=12), judge=flaky, say=lambda _: None)
    assert CALLS["n"] == total - judged_before
    assert (tmp_path / "cut.jsonl").read_bytes() == whole.output.read_bytes()
    with pytest.raises(PreftuneError, match="cut.jsonl was made with other settings \\(samples 4 → 3\\); rerun"):
        make_pairs(cfg(tmp_path / "cut.jsonl", samples=3), judge=flaky, say=lambda _: None)
    (tmp_path / "mine.jsonl").write_text("{}\n")
    with pytest.raises(PreftuneError, match="mine.jsonl exists and no mine.state/ folder"):
        make_pairs(cfg(tmp_path / "mine.jsonl"), judge=flaky, say=lambda _: None)
    assert (tmp_path / "mine.jsonl").read_text() == "{}\n"


def test_a_kill_between_the_rows_and_the_done_lines(tmp_path):
    """Rows of a prompt without its done line (and a line cut in the middle) are dropped when the run reopens, and
    a done line without its rows."""
    store = PairsStore(tmp_path / "p.jsonl")
    assert store.open({"seed": 1}) == {}
    row = {"prompt": "q", "chosen": "a", "rejected": "b", "source": {"prompt_index": 0}}
    store.append([row], [{"i": 0, "pairs": [[1, 1, 1]]}])
    store.append([{**row, "source": {"prompt_index": 1}}], [])  # killed before its done line
    with store.output.open("a") as f:
        f.write('{"prompt": "half a li')
    assert list(PairsStore(tmp_path / "p.jsonl").open({"seed": 1})) == [0]
    assert store.output.read_text() == json.dumps(row) + "\n"
    store.output.unlink()  # the pairs file removed by hand: its prompts are done again
    assert PairsStore(tmp_path / "p.jsonl").open({"seed": 1}) == {}
    with pytest.raises(PreftuneError, match="p.jsonl was made with other settings \\(seed 1 → 2\\)"):
        PairsStore(tmp_path / "p.jsonl").open({"seed": 2})


def _env(**kw) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1", **kw}


def _cli_args(files: Path, model: Path, out: Path) -> list[str]:
    return ["pairs", "--model", str(model), "--prompts", str(files / "train.jsonl"), "--judge",
            f"{files / 'judge.py'}:score", "--output", str(out), "--samples", "4", "--max-new-tokens", "3",
            "--top-k", "2", "--batch-size", "8", "--device", "cpu", "--progress", "false"]


def test_two_processes_one_killed_and_restarted_write_what_one_writes(files, tiny_model_dir, reference, tmp_path,
                                                                     monkeypatch, capsys):
    """Processes 0 and 1 of 2 (the RANK / WORLD_SIZE / LOCAL_RANK that torchrun and accelerate launch set; no
    process group is needed): process 1 is SIGKILLed at its 5th judge call while process 0 finishes its share and
    waits; process 1 started again judges only what it had not done, and process 0 gathers one file, equal to the
    one-process run's byte for byte."""
    out = tmp_path / "pairs.jsonl"
    cmd = [sys.executable, "-m", "preftune", *_cli_args(files, tiny_model_dir, out)]
    ranks = [{"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2"} for r in (0, 1)]
    first = subprocess.Popen(cmd, env=_env(**ranks[0]), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _kill_and_restart(files, tiny_model_dir, out, cmd, ranks, monkeypatch, capsys)
        stdout, stderr = first.communicate(timeout=300)
    finally:
        first.kill()  # process 0 waits for the prompts of process 1: never leave it behind a failed assertion
    assert first.returncode == 0, stderr[-2000:]
    assert stdout.count("pairs: ") == 1
    assert out.read_bytes() == reference.output.read_bytes()
    assert sorted(p.name for p in (tmp_path / "pairs.state").iterdir()) == ["done-0.jsonl", "settings.json"]


def _kill_and_restart(files, tiny_model_dir, out, cmd, ranks, monkeypatch, capsys) -> None:
    killed = subprocess.run(cmd, env=_env(**ranks[1], PAIRS_KILL_AT="5"), capture_output=True, text=True,
                            timeout=300)  # while process 0 runs
    assert killed.returncode == -9, killed.stderr[-2000:]
    store = PairsStore(out)
    assert 0 < len([d for d in store.done().values() if d["i"] % 2 == 1]) < 6
    for key, value in ranks[1].items():  # process 1 again, in this interpreter (no second start-up to pay)
        monkeypatch.setenv(key, value)
    assert main(_cli_args(files, tiny_model_dir, out)) == 0
    assert "pairs: " not in capsys.readouterr().out  # one summary, from process 0


@pytest.mark.parametrize("flags, message", [
    (["--samples", "1"], "samples must be at least 2 \\(got 1\\); a pair needs two answers to compare.$"),
    (["--temperature", "0"], "temperature must be > 0 \\(got 0\\); greedy decoding gives every sample the same"),
    (["--prompts", "EMPTY"], "EMPTY.jsonl is empty"),
    (["--judge", "MISSING.py:score"], "the judge file .*MISSING.py does not exist."),
    (["--judge", "RM"], "the reward model .*RM has 3 outputs \\(num_labels\\); a reward model is a sequence "
                        "classifier with one output per answer \\(num_labels 1\\)."),
    (["--judge-url", "URL", "--judge-model", "m"], "pass one judge: --judge"),
])
def test_bad_input_is_one_sentence_and_exit_2(flags, message, files, tiny_model_dir, tmp_path, capsys):
    (tmp_path / "EMPTY.jsonl").write_text("")
    (tmp_path / "RM").mkdir()
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    (tmp_path / "RM" / "config.json").write_text(json.dumps({**cfg, "architectures": ["LlamaForSequenceClassification"],
                                                              "id2label": {"0": "a", "1": "b", "2": "c"}}))
    args = _cli_args(files, tiny_model_dir, tmp_path / "out.jsonl")
    for flag, value in zip(flags[::2], flags[1::2]):
        value = {"EMPTY": str(tmp_path / "EMPTY.jsonl"), "MISSING.py:score": f"{tmp_path}/MISSING.py:score",
                 "RM": str(tmp_path / "RM"), "URL": "http://127.0.0.1:9/v1"}.get(value, value)
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err), err
    assert not (tmp_path / "out.jsonl").exists()


def test_an_unreachable_endpoint_is_one_sentence(files, tiny_model_dir, tmp_path, capsys):
    args = _cli_args(files, tiny_model_dir, tmp_path / "out.jsonl")
    args = args[:args.index("--judge")] + args[args.index("--judge") + 2:]
    assert main([*args, "--judge-url", "http://127.0.0.1:9/v1", "--judge-model", "m"]) == 2
    assert re.fullmatch("preftune: error: cannot reach the judge endpoint http://127.0.0.1:9/v1 \\(.*\\); start the "
                        "server or check --judge-url.\n", capsys.readouterr().err)


def test_chat_prompts_pairwise_judge_all_pairs(tiny_model_dir, tmp_path):
    """--chat: the rows are conversations whose prompt train renders to exactly the text that was sampled from;
    a pairwise judge (fewer characters wins) and all-pairs with at most 2 pairs, largest gaps first."""
    from transformers import AutoTokenizer

    model = tmp_path / "chat_model"
    shutil.copytree(tiny_model_dir, model)
    tok = AutoTokenizer.from_pretrained(model)
    tok.chat_template = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}</s>{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    tok.save_pretrained(model)
    (tmp_path / "p.txt").write_text("red cat\nblue river\n")

    def fewer_characters(prompt, a, b):
        return "a" if len(a) < len(b) else "b" if len(b) < len(a) else "tie"

    result = make_pairs(model=str(model), prompts=str(tmp_path / "p.txt"), output=str(tmp_path / "pairs.jsonl"),
                        judge=fewer_characters, chat=True, samples=3, max_new_tokens=4, select="all-pairs",
                        max_pairs_per_prompt=2, device="cpu", progress=False, say=lambda _: None)
    rows = [json.loads(x) for x in result.output.read_text().splitlines()]
    loaded = load_records(str(result.output))
    assert loaded.format == "conversational" and len(loaded.records) == len(rows) > 0
    for row in rows:
        assert row["prompt"][0]["role"] == "user" and row["chosen"][0]["role"] == "assistant"
        assert render_texts(tok, row)[0] == prompt_text(tok, row["prompt"][0]["content"], chat=True) == \
            f"<|user|>{row['prompt'][0]['content']}</s><|assistant|>"
        assert len(row["chosen"][0]["content"]) <= len(row["rejected"][0]["content"])
        assert row["score_chosen"] - row["score_rejected"] == row["gap"] > 0  # wins + half ties, out of 2 meetings
    per_prompt = [sum(r["source"]["prompt_index"] == i for r in rows) for i in (0, 1)]
    assert max(per_prompt) <= 2 and result.summary["pairs"] == len(rows)
