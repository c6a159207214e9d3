"""The collapse check of `preftune iterate` on hand-made metric rows and evaluations: which signal fires, and that
a round collapsed only when the judge says it got worse, or when the log-probs fell and the KL jumped together."""

from __future__ import annotations

import pytest

from preftune.judging import win_rate
from preftune.onpolicy.collapse import check_round, no_gain, unmoved


def rows(chosen: tuple[float, float], rejected: tuple[float, float], n: int = 10) -> list[dict]:
    """n logged training steps moving linearly from the first to the last value (the first and last tenth of 10
    steps are the first and the last row)."""
    def at(pair, i):
        return pair[0] + (pair[1] - pair[0]) * i / (n - 1)

    return [{"step": i + 1, "split": "train", "logps/chosen": at(chosen, i), "logps/rejected": at(rejected, i)}
            for i in range(n)]


HEALTHY = rows((-20.0, -19.5), (-20.0, -35.0))   # chosen rose: DPO as meant
DISPLACED = rows((-20.0, -25.0), (-20.0, -40.0))  # chosen fell 5 nats > max(1, 1% of 20): displacement
EVEN = win_rate(["model"] * 10 + ["reference"] * 10)  # 50%, 95% Wilson interval ~[30, 70]: no signal
WORSE = win_rate(["reference"] * 20)  # 0 of 20: Wilson upper end z²/(n+z²) = 3.8416/23.8416 = 0.161 < 0.5


def evaluation(kl: float = 0.1, greedy: dict = EVEN, samples: dict = EVEN) -> dict:
    return {"kl_start": {"per_token": kl}, "vs_start": greedy, "samples_vs_start": samples}


def test_wilson_upper_end_of_a_round_that_lost_every_prompt():
    assert WORSE["ci95"][1] == pytest.approx(3.8416 / 23.8416, abs=1e-3)


@pytest.mark.parametrize(("train_rows", "ev", "fired", "collapsed"), [
    (HEALTHY, evaluation(), set(), False),
    (DISPLACED, evaluation(), {"displacement"}, False),                   # common in rounds that went well
    (HEALTHY, evaluation(kl=3.0), {"kl"}, False),                         # so is moving far from the start
    (DISPLACED, evaluation(kl=3.0), {"displacement", "kl"}, True),        # both together: collapse
    (HEALTHY, evaluation(samples=WORSE), {"judged"}, True),               # the judge: samples got worse
    (HEALTHY, evaluation(greedy=WORSE), {"judged"}, True),                # ... or greedy answers
    (DISPLACED, evaluation(kl=2.0), {"displacement"}, False),             # the limit itself is not above it
])
def test_which_signals_fire_and_when_they_mean_collapse(train_rows, ev, fired, collapsed):
    verdict = check_round(train_rows, ev, kl_limit=2.0)
    assert set(verdict.signals) == fired and verdict.collapsed is collapsed


def test_the_reason_names_what_each_signal_saw():
    verdict = check_round(DISPLACED, evaluation(kl=3.0, samples=WORSE), kl_limit=2.0)
    assert verdict.reason() == (
        "chosen log-probs fell with the rejected ones (chosen -20.0 → -25.0, rejected -20.0 → -40.0 nats); "
        "KL to the round's start jumped to 3.00 nats/token (limit 2); "
        "the judge prefers the start's samples (win rate 0.0%, 95% 0.0%..16.1%)")


def test_no_gain_is_a_win_rate_interval_that_includes_one_half():
    """12 of 20: Wilson [0.387, 0.781] holds 0.5; 18 of 20: [0.699, 0.972] does not; 2 of 20 loses clearly (a
    collapse, not a stall, but no gain either)."""
    assert no_gain(win_rate(["model"] * 12 + ["reference"] * 8))
    assert not no_gain(win_rate(["model"] * 18 + ["reference"] * 2))
    assert not no_gain(win_rate(["model"] * 2 + ["reference"] * 18))
    assert no_gain(None)


def _answers(texts: list[str], kl: float | None = 2e-5) -> dict:
    return {"greedy": {"texts": texts}, "kl_start": {"per_token": kl}}


def test_a_round_whose_greedy_answers_did_not_change_names_the_learning_rate():
    """19 of 20 answers unchanged = 95% ≥ the 95% share and |KL| 2e-5 < 1e-3: a note naming the rate; 18 of 20 =
    90%: none; KL 0.007 (the news demo's third round, 193 of 200 unchanged, near its ceiling) or -2e-3: none; no KL,
    a missing or mismatched evaluation: none."""
    start = [f"answer {i}" for i in range(20)]
    note = unmoved(_answers(start[:19] + ["new"]), _answers(start), learning_rate=1e-6)
    assert note is not None and note.startswith("19 of 20 held-out greedy answers") and "2.0e-05" in note
    assert "now 1e-06" in note
    assert unmoved(_answers(start[:19] + ["new"], kl=-2e-5), _answers(start), learning_rate=1e-6) is not None
    assert unmoved(_answers(start[:18] + ["new", "new"]), _answers(start), learning_rate=1e-6) is None
    for kl in (0.007, -2e-3, None):
        assert unmoved(_answers(start, kl=kl), _answers(start), learning_rate=1e-6) is None
    assert unmoved(_answers(start), _answers(start[:10]), learning_rate=1e-6) is None
    assert unmoved({}, _answers(start), learning_rate=1e-6) is None
