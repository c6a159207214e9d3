"""The demo's judge: does a summary state the article's key facts, only those, and briefly?

A judge is a plain function ``judge(article, summary) -> JudgeResult``. The default, `judge_summary`,
checks three things against the facts the generator put in the article (`Article.facts`):

* factual: every key fact appears (organisation, number, what, place, date "Month Day"), and no wrong fact
  does: no other number than the key number and the day, no other organisation, place or month that the
  generator knows of;
* concise: the word count lies in the reference's range (`Article.length_range`, 60%..150%);
* good: factual and concise.

Replace it with your own by passing ``module:function`` (`load_judge`), e.g. a function that calls a
larger model. It has the same pointwise protocol, ``judge(article: news.Article, summary: str)``, and may
return a `JudgeResult` or a mapping with the keys "factual", "concise" and "good" (and optionally "reasons").

`score(prompt, answer) -> float` is the graded, pointwise judge `preftune pairs` takes (`--judge
examples/news_demo/judge.py:score`): key facts present, plus one if concise, minus two per wrong fact
(`graded_score`), with the facts read back from the prompt alone.

`PairwiseJudge` turns a pointwise judge into preftune's pairwise protocol (`preftune.judging`:
``judge(prompt, answer_a, answer_b) -> "a" | "b" | "tie"``), so the demo also reports the library's win
rate of DPO over SFT with its 95% Wilson interval.
"""

from __future__ import annotations

import functools
import inspect
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

try:
    import examples.news_demo.news  # noqa: F401
except ModuleNotFoundError:
    # Loaded as a file (`preftune pairs --judge examples/news_demo/judge.py:score`) by a process whose path lacks
    # the repository root (the `preftune` console script does not put the current directory on it).
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from examples.news_demo.news import (
    MONTHS,
    ORGS,
    PLACES,
    Article,
    article_from_prompt,
    count_words,
    make_prompt,
)
from preftune.errors import PreftuneError
from preftune.judging import import_function


@dataclass(frozen=True)
class JudgeResult:
    """A verdict on one summary; `reasons` names each missing or wrong fact and a length problem."""

    factual: bool
    concise: bool
    good: bool
    reasons: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["reasons"] = list(self.reasons)
        return d


Judge = Callable[[Article, str], Any]


def _mentions(text: str, phrase: str) -> bool:
    # Whole words only, so that "30" is not found inside "300" nor "Porto" inside "Portoviejo".
    return re.search(rf"(?<![\w]){re.escape(phrase)}(?![\w])", text, flags=re.IGNORECASE) is not None


def check_facts(article: Article, summary: str) -> tuple[list[str], list[str]]:
    """(missing, wrong): each key fact the summary lacks and each wrong fact it states, as reasons."""
    f = article.facts
    missing = [f"missing {key} {f[key]!r}" for key in ("org", "number", "what", "place")
               if not _mentions(summary, f[key])]
    if not re.search(rf"\b{re.escape(f['month'])}\s+{f['day']}\b", summary, flags=re.IGNORECASE):
        missing.append(f"missing date {f['date']!r}")
    allowed_numbers = {f["number"], f["day"]}
    wrong = [f"wrong number {num!r}" for num in re.findall(r"\d+", summary) if num not in allowed_numbers]
    for key, known in (("org", ORGS), ("place", PLACES), ("month", MONTHS)):
        wrong += [f"wrong {key} {name!r}" for name in known if name != f[key] and _mentions(summary, name)]
    return missing, wrong


def judge_summary(article: Article, summary: str) -> JudgeResult:
    """Judge `summary` of `article`: factual, concise, and good = both (see the module docstring)."""
    missing, wrong = check_facts(article, summary)
    reasons = missing + wrong
    factual = not reasons
    lo, hi = article.length_range
    n_words = count_words(summary)
    concise = lo <= n_words <= hi
    if not concise:
        reasons.append(f"{n_words} words, outside {lo}..{hi}")
    return JudgeResult(factual=factual, concise=concise, good=factual and concise, reasons=tuple(reasons))


KEY_FACTS = 5  # org, number, what, place, date
WRONG_FACT_PENALTY = 2


def graded_score(article: Article, summary: str) -> float:
    """The graded score of `summary`: key facts present (0-5) + 1 if concise − 2 per wrong fact stated.

    The reference scores 6, and so does every good summary; a verbose one 5; a wrong number (4 facts, concise,
    one wrong) 3; a vague one 1; the copied filler sentence (no key fact, one wrong number) −1. A wrong fact
    costs twice a missing one: stating a wrong number is worse than leaving it out."""
    missing, wrong = check_facts(article, summary)
    lo, hi = article.length_range
    concise = lo <= count_words(summary) <= hi
    return float(KEY_FACTS - len(missing) + concise - WRONG_FACT_PENALTY * len(wrong))


@functools.lru_cache(maxsize=4096)
def _article(prompt: str) -> Article:
    return article_from_prompt(prompt)  # parsed once per prompt, not once per answer


def score(prompt: str | list[dict], answer: str) -> float:
    """`graded_score` of `answer` to a demo prompt: the pointwise judge protocol of `preftune pairs`,

        preftune pairs --model examples/news_demo/assets/base --prompts prompts.jsonl \\
          --judge examples/news_demo/judge.py:score --samples 4 --output pairs.jsonl

    The article's facts are read back from the prompt (`news.article_from_prompt`); chat messages are
    judged by their last user turn. A prompt that holds no demo article raises, which `pairs` reports
    with the prompt's line."""
    if isinstance(prompt, list):
        prompt = next(m["content"] for m in reversed(prompt) if m.get("role") == "user")
    return graded_score(_article(prompt), answer.strip())


def as_judge_result(value: Any) -> JudgeResult:
    """A `JudgeResult` from what a judge returned: a JudgeResult, or a mapping with factual/concise/good."""
    if isinstance(value, JudgeResult):
        return value
    if isinstance(value, Mapping) and all(k in value for k in ("factual", "concise", "good")):
        return JudgeResult(factual=bool(value["factual"]), concise=bool(value["concise"]),
                           good=bool(value["good"]), reasons=tuple(value.get("reasons", ())))
    raise PreftuneError(
        f"a judge must return a JudgeResult or a mapping with keys factual, concise and good, "
        f"got {type(value).__name__}.")


def load_judge(spec: str | Judge | None) -> Judge:
    """The judge named by `spec`: None for `judge_summary`, a callable as is, or ``"module:function"``;
    refused with one sentence unless it can be called as ``judge(article, summary)``."""
    if spec is None:
        return judge_summary
    func = spec if callable(spec) else import_function(spec, "demo judge")
    try:
        inspect.signature(func).bind("article", "summary")
    except TypeError:
        raise PreftuneError(
            f"the judge {spec if isinstance(spec, str) else getattr(func, '__qualname__', func)!r} cannot be called "
            "as judge(article, summary); the demo's judge is pointwise (a pairwise judge(prompt, answer_a, "
            "answer_b) is what `preftune eval --judge` takes).") from None
    except ValueError:  # builtins without a signature: trust them
        pass
    return func


class PairwiseJudge:
    """A pointwise `judge` in preftune's pairwise protocol, over the articles whose prompts it will be shown.

    ``pairwise(prompt, answer_a, answer_b)`` finds the article by its prompt (`news.make_prompt`) and returns
    "a" when only answer a is good, "b" when only b is, "tie" when both or neither are: the good verdict is
    the demo's headline criterion, so wins minus losses equals the difference of the two good counts.
    `verdict` judges one summary; verdicts are kept per (article, summary), so the good-rate table and the
    win rate together call a user's judge (a larger model, say) once per summary.
    """

    def __init__(self, judge: Judge, articles: list[Article]):
        self.judge = judge
        self.articles = {make_prompt(a): a for a in articles}
        self._verdicts: dict[tuple[str, str], JudgeResult] = {}

    def verdict(self, article: Article, summary: str) -> JudgeResult:
        key = (article.id, summary)
        if key not in self._verdicts:
            self._verdicts[key] = as_judge_result(self.judge(article, summary))
        return self._verdicts[key]

    def __call__(self, prompt: str, answer_a: str, answer_b: str) -> str:
        article = self.articles.get(prompt)
        if article is None:
            raise PreftuneError("the pairwise judge was shown a prompt of none of its articles.")
        a, b = (self.verdict(article, answer.strip()).good for answer in (answer_a, answer_b))
        return "tie" if a == b else ("a" if a else "b")
