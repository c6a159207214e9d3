"""The on-policy story (`--on-policy`), shortened: one run, and its figures checked against the files it wrote
(the pairs, the gap split, every model's judged summaries), worked out again here from those files."""

from __future__ import annotations

import json

import pytest

from examples.news_demo import news
from examples.news_demo.judge import graded_score, judge_summary, score
from examples.news_demo.onpolicy import run_onpolicy_demo, split_by_gap
from examples.news_demo.pipeline import MANIFEST
from preftune.audit import audit
from preftune.errors import PreftuneError
from preftune.judging import wilson_interval

N_EVAL = 12


def jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def story(tmp_path_factory):
    out = tmp_path_factory.mktemp("onpolicy") / "demo"
    return out, run_onpolicy_demo(out, quick=True, n_eval=N_EVAL, progress=False)


def test_pairs_are_the_sft_models_samples_scored_by_the_graded_judge(story):
    """Every pair in the file: its scores are `judge.score` of its two summaries (worked out again), chosen
    above rejected, gap = the difference; the summary's counts are the file's."""
    out, res = story
    rows = jsonl(out / "data" / "onpolicy_pairs.jsonl")
    assert res["pairs_summary"]["pairs"] == len(rows) == res["models"]["onpolicy"]["pairs"] > 0
    for r in rows:
        assert (score(r["prompt"], r["chosen"]), score(r["prompt"], r["rejected"])) == (r["score_chosen"],
                                                                                        r["score_rejected"])
        assert r["gap"] == r["score_chosen"] - r["score_rejected"] > 0
        assert r["source"]["judge"].endswith("examples/news_demo/judge.py:score")
    prompts = jsonl(out / "data" / "prompts.jsonl")
    assert len(prompts) == res["settings"]["n_articles"] == res["pairs_summary"]["prompts"]
    assert {r["prompt"] for r in rows} <= {p["prompt"] for p in prompts}


def test_gap_split_has_equal_numbers_on_either_side_of_the_thresholds(story):
    out, res = story
    rows = jsonl(out / "data" / "onpolicy_pairs.jsonl")
    g = res["gap_experiment"]
    small, large = jsonl(out / "data" / "gap_small.jsonl"), jsonl(out / "data" / "gap_large.jsonl")
    assert g["available"] == {"small": sum(r["gap"] <= 3 for r in rows), "large": sum(r["gap"] >= 5 for r in rows)}
    assert len(small) == len(large) == g["pairs_each"] == min(g["available"].values()) > 0
    assert all(r["gap"] <= 3 for r in small) and all(r["gap"] >= 5 for r in large)
    assert all(r in rows for r in small + large)
    assert (small, large) == split_by_gap(rows, 3, 5, seed=0)  # seeded: the same split again
    assert [k for k in res["models"]] == ["sft", "handmade", "onpolicy", "gap_small_0", "gap_large_0", "round_1"]


def test_every_models_figures_are_its_judged_summaries(story):
    """Each model's good count and rates are those of its verdicts in summaries.jsonl, the verdicts are the
    demo's judge on its summaries, the interval is Wilson's for good of N_EVAL, the mean score graded_score's."""
    out, res = story
    rows = jsonl(out / "summaries.jsonl")
    held = [news.Article(**{**a, "filler": tuple(a["filler"])}) for a in jsonl(out / "data" / "heldout_articles.jsonl")]
    assert len(rows) == len(held) == res["n_eval"] == N_EVAL
    for key, m in res["models"].items():
        x = m["metrics"]
        verdicts = [judge_summary(a, r[key]) for a, r in zip(held, rows)]
        assert [r[f"{key}_verdict"]["good"] for r in rows] == [v.good for v in verdicts]
        good = sum(v.good for v in verdicts)
        assert (x["good"], x["good_rate"]) == (good, round(good / N_EVAL, 4))
        assert x["factual_rate"] == round(sum(v.factual for v in verdicts) / N_EVAL, 4)
        assert x["good_ci95"] == [round(b, 4) for b in wilson_interval(good, N_EVAL)]
        assert x["mean_score"] == round(sum(graded_score(a, r[key]) for a, r in zip(held, rows)) / N_EVAL, 3)
    assert json.loads((out / "onpolicy.json").read_text()) == json.loads(json.dumps(res))
    assert set(json.loads((out / MANIFEST).read_text())["entries"]) == {p.name for p in out.iterdir()} - {MANIFEST}


def test_inspect_reads_the_pairs_file(story):
    """`preftune inspect` on the story's pairs: the gap histogram holds every pair, and the chosen-longer share
    is the one worked out from the sampled token counts the rows record."""
    out, _ = story
    rows = jsonl(out / "data" / "onpolicy_pairs.jsonl")
    g = audit(str(out / "data" / "onpolicy_pairs.jsonl"))["gaps"]
    longer = sum(r["source"]["chosen_tokens"] > r["source"]["rejected_tokens"] for r in rows)
    assert g["pairs"] == sum(g["histogram"]["counts"]) == len(rows)
    assert g["length_unit"] == "tokens as sampled" and g["chosen_longer"] == round(longer / len(rows), 4)
    assert g["smallest"][0]["gap"] == min(r["gap"] for r in rows)


def test_iterate_round_one_is_the_storys_pairs_and_its_evaluation_agrees(story):
    """Round 1 of `preftune iterate` samples from the SFT model with the story's seed, prompts and judge: the same
    pairs as `pairs` made. Its held-out evaluation judges the same greedy summaries with the graded score, where
    a 6 is exactly the demo's "good": its good shares are the story's good rates for SFT and for round 1's model."""
    out, res = story
    it = res["iterate"]
    key = lambda r: (r["prompt"], r["chosen"], r["rejected"], r["gap"])  # noqa: E731
    story_pairs = [key(r) for r in jsonl(out / "data" / "onpolicy_pairs.jsonl")]
    assert [key(r) for r in jsonl(out / "iterate" / "round-1" / "pairs.jsonl")] == story_pairs
    assert [r["round"] for r in it["rounds"]] == [0, 1] and it["rounds"][1]["pairs"] == len(story_pairs)
    for row, model in zip(it["rounds"], ("sft", "round_1")):
        m = res["models"][model]["metrics"]
        assert row["good_share"] == pytest.approx(m["good_rate"], abs=1e-4)
        assert row["score_mean"] == pytest.approx(m["mean_score"], abs=1e-3)
    assert res["models"]["round_1"]["dir"] == it["result"] == it["rounds"][1]["model"]


def test_bad_input_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(PreftuneError, match="the judge file .*nope.py does not exist"):
        run_onpolicy_demo(tmp_path / "a", pairs_judge=str(tmp_path / "nope.py") + ":score")
    with pytest.raises(PreftuneError, match="n_eval must be at least 1"):
        run_onpolicy_demo(tmp_path / "b", n_eval=0)
    assert list(tmp_path.iterdir()) == []
