"""The demo's judge on hand-written summaries of one hand-written article, and load_judge's errors."""

from __future__ import annotations

import pytest

from examples.news_demo.judge import JudgeResult, PairwiseJudge, as_judge_result, judge_summary, load_judge
from examples.news_demo.news import Article, make_prompt
from preftune.errors import PreftuneError

FACTS = {"org": "Redfern Company", "verb": "open", "what": "sports halls", "number": "300", "place": "Krakow",
         "month": "March", "day": "12", "date": "March 12", "topic": "sport",
         "distractor_number": "460", "distractor_place": "Tallinn"}
ARTICLE = Article(
    id="hand-1", split="heldout",
    text=("Redfern Company said on March 12 that it will open 300 sports halls in Krakow.\n\n"
          "Coaches said 460 children had joined waiting lists for local teams. "
          "Officials praised a similar investment in Tallinn that doubled attendance."),
    facts=FACTS, reference="Redfern Company will open 300 sports halls in Krakow, it said on March 12.",
    filler=("Coaches said 460 children had joined waiting lists for local teams.",
            "Officials praised a similar investment in Tallinn that doubled attendance."))


def test_reference_range_is_60_to_150_percent_of_14_words():
    """The reference has 14 words: round(0.6*14)=8, round(1.5*14)=21."""
    assert ARTICLE.length_range == (8, 21)


@pytest.mark.parametrize("summary", [
    "Redfern Company will open 300 sports halls in Krakow, it said on March 12.",
    "On March 12, Redfern Company said it would open 300 sports halls in Krakow.",
    "redfern company will open 300 sports halls in krakow, announced march 12.",
])
def test_good_summaries(summary):
    r = judge_summary(ARTICLE, summary)
    assert (r.factual, r.concise, r.good, r.reasons) == (True, True, True, ())


def test_verbose_is_factual_but_not_concise():
    """14 + 16 + 16 = 46 words > 21."""
    s = (ARTICLE.reference + " This is a very important development that many people in the area have been "
         "waiting for. It is expected to have a significant impact on the local community in the coming years.")
    r = judge_summary(ARTICLE, s)
    assert (r.factual, r.concise, r.good) == (True, False, False)
    assert r.reasons == ("46 words, outside 8..21",)


def test_vague_misses_every_fact():
    r = judge_summary(ARTICLE, "A local organisation announced new plans for sport in a city.")
    assert (r.factual, r.concise, r.good) == (False, True, False)
    assert r.reasons == ("missing org 'Redfern Company'", "missing number '300'", "missing what 'sports halls'",
                         "missing place 'Krakow'", "missing date 'March 12'")


@pytest.mark.parametrize("summary, reasons", [
    ("Redfern Company will open 460 sports halls in Krakow, it said on March 12.",
     ("missing number '300'", "wrong number '460'")),
    ("Redfern Company will open 300 sports halls in Tallinn, it said on March 12.",
     ("missing place 'Krakow'", "wrong place 'Tallinn'")),
    ("Northwind Group will open 300 sports halls in Krakow, it said on March 12.",
     ("missing org 'Redfern Company'", "wrong org 'Northwind Group'")),
    ("Redfern Company will open 300 sports halls in Krakow, it said on April 12.",
     ("missing date 'March 12'", "wrong month 'April'")),
    # "30" must not count as present inside "300", nor "300" inside "3000".
    ("Redfern Company will open 30 sports halls in Krakow, it said on March 12.",
     ("missing number '300'", "wrong number '30'")),
])
def test_wrong_facts(summary, reasons):
    r = judge_summary(ARTICLE, summary)
    assert (r.factual, r.concise, r.good) == (False, True, False)
    assert r.reasons == reasons


def test_copied_filler_misses_facts_and_has_a_wrong_number():
    r = judge_summary(ARTICLE, "Coaches said 460 children had joined waiting lists for local teams.")
    assert not r.factual and not r.good
    assert "wrong number '460'" in r.reasons and "missing org 'Redfern Company'" in r.reasons


def test_too_short_is_not_concise():
    """'Redfern Company in Krakow.' has 4 words < 8 (the facts alone take 8 words, so a factual summary is
    never too short)."""
    r = judge_summary(ARTICLE, "Redfern Company in Krakow.")
    assert (r.factual, r.concise, r.good) == (False, False, False)
    assert r.reasons[-1] == "4 words, outside 8..21"


def my_judge(article, summary):
    return {"factual": True, "concise": len(summary) < 10, "good": len(summary) < 10}


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A user's own module on PYTHONPATH, with a judge function and a constant."""
    (tmp_path / "my_judges.py").write_text(
        "def short(article, summary):\n    return {'factual': True, 'concise': True, 'good': len(summary) < 10}\n"
        "NOT_A_FUNCTION = 3\n"
        "def pairwise(prompt, answer_a, answer_b):\n    return 'tie'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_judges"


def test_load_judge_default_callable_and_module_function(user_module):
    assert load_judge(None) is judge_summary
    assert load_judge(my_judge) is my_judge
    assert load_judge("examples.news_demo.judge:judge_summary") is judge_summary
    short = load_judge(f"{user_module}:short")
    assert short(ARTICLE, "tiny")["good"] and not short(ARTICLE, ARTICLE.reference)["good"]


@pytest.mark.parametrize("spec, match", [
    ("judge_summary", "module:function"),
    ("a:b:c", "cannot import the demo judge module .a:b."),
    (":judge", "module:function"),
    ("no_such_module_xyz:judge", "cannot import"),
    ("examples.news_demo.judge:nothing_here", "has no function"),
    ("my_judges:NOT_A_FUNCTION", "not a function"),
    ("my_judges:pairwise", r"cannot be called as judge\(article, summary\); the demo's judge is pointwise"),
])
def test_load_judge_errors(spec, match, user_module):
    with pytest.raises(PreftuneError, match=match):
        load_judge(spec)


def test_as_judge_result_accepts_mappings_and_refuses_other_values():
    assert as_judge_result(my_judge(ARTICLE, "short")) == JudgeResult(True, True, True)
    r = JudgeResult(False, True, False, ("x",))
    assert as_judge_result(r) is r
    with pytest.raises(PreftuneError, match="JudgeResult or a mapping"):
        as_judge_result(True)


GOOD = "Redfern Company will open 300 sports halls in Krakow, it said on March 12."
BAD = "A local organisation announced new plans for sport in a city."
VERBOSE = GOOD + " This is a very important development that many people in the area have been waiting for."


def test_pairwise_judge_compares_good_verdicts():
    """Only one answer good: it wins, whichever side it is on; both good or both bad (VERBOSE is factual but
    30 words, over 21): a tie."""
    pairwise = PairwiseJudge(judge_summary, [ARTICLE])
    prompt = make_prompt(ARTICLE)
    assert pairwise(prompt, GOOD, BAD) == "a" and pairwise(prompt, BAD, GOOD) == "b"
    assert pairwise(prompt, " " + GOOD, VERBOSE) == "a"  # answers are stripped as the demo's summaries are
    assert pairwise(prompt, GOOD, GOOD) == "tie" and pairwise(prompt, BAD, VERBOSE) == "tie"
    with pytest.raises(PreftuneError, match="none of its articles"):
        pairwise("another prompt", GOOD, BAD)


def test_pairwise_judge_with_preftune_judging_gives_the_hand_counted_win_rate():
    """preftune's `load_judge` accepts the wrapper as a pairwise judge; on 4 side-by-side rows (DPO, SFT) =
    (good, bad), (good, good), (bad, bad), (good, bad): 2 wins, 2 ties, 0 losses whatever the coin flips,
    so the win rate is (2 + 2/2)/4 = 0.75. Each distinct summary is judged once (2 of them)."""
    from preftune.judging import judge_pairs, load_judge, win_rate

    calls = []

    def counting(article, summary):
        calls.append(summary)
        return judge_summary(article, summary)

    pairwise = PairwiseJudge(counting, [ARTICLE])
    assert load_judge(pairwise) is pairwise
    prompts = [make_prompt(ARTICLE)] * 4
    rows = judge_pairs(pairwise, prompts, [GOOD, GOOD, BAD, GOOD], [BAD, GOOD, BAD, BAD], seed=3)
    result = win_rate([r["verdict"] for r in rows])
    assert (result["wins"], result["losses"], result["ties"], result["win_rate"]) == (2, 0, 2, 0.75)
    assert sorted(calls) == sorted([GOOD, BAD])
    assert pairwise.verdict(ARTICLE, GOOD).good and not pairwise.verdict(ARTICLE, BAD).good
    assert len(calls) == 2


@pytest.mark.parametrize("summary, expected", [
    (GOOD, 6.0),                  # 5 facts + concise
    (VERBOSE, 5.0),               # 5 facts, 30 words > 21
    (BAD, 1.0),                   # no fact, concise
    ("Redfern Company will open 460 sports halls in Krakow, it said on March 12.", 3.0),   # 4 + 1 − 2·1
    ("Redfern Company will open 460 sports halls in Tallinn, it said on March 12.", 0.0),  # 3 + 1 − 2·2
    ("Coaches said 460 children had joined waiting lists for local teams.", -1.0),         # 0 + 1 − 2·1
    ("Redfern Company in Krakow.", 2.0),                                                   # 2 + 0 (4 words < 8)
])
def test_graded_score_counts_facts_concision_and_wrong_facts(summary, expected):
    """score = key facts present (of 5) + 1 if concise − 2 per wrong fact, from the prompt alone; the same as
    graded_score on the article itself."""
    from examples.news_demo.judge import graded_score, score

    assert graded_score(ARTICLE, summary) == expected
    assert score(make_prompt(ARTICLE), " " + summary) == expected  # answers are stripped, as sampled ones start
    assert score([{"role": "system", "content": "be brief"}, {"role": "user", "content": make_prompt(ARTICLE)}],
                 summary) == expected


def test_score_loads_as_a_file_judge_for_preftune_pairs():
    """`--judge examples/news_demo/judge.py:score` (the file form, imported under another module name; its
    dataclasses need the module registered) gives a pointwise judge; a prompt of no demo article is the judge's
    one-sentence error naming the prompt's line."""
    from pathlib import Path

    from examples.news_demo import judge as judge_module
    from preftune.onpolicy.judges import Group, function_judge

    judge = function_judge(f"{Path(judge_module.__file__)}:score")
    assert judge.kind == "pointwise"
    assert judge.score([Group(make_prompt(ARTICLE), [GOOD, BAD], "p.jsonl line 1", 0)]) == [[6.0, 1.0]]
    with pytest.raises(PreftuneError, match=r"judge.py:score raised ValueError: no news demo article in the prompt "
                                            r"\(no lead sentence the demo's generator writes\) on the prompt at "
                                            r"p.jsonl line 2.$"):
        judge.score([Group("Summarize: nothing.", [GOOD, BAD], "p.jsonl line 2", 1)])
