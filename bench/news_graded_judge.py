"""A graded pointwise judge of the news demo's summaries, for measuring `preftune iterate` (bench/iterate_defaults.py).

    score(prompt, answer) -> float   # 1.0 for a good summary (the demo's judge_summary), else partial credit

The demo's own judge (examples/news_demo/judge.py) says good or not; best-vs-worst selection needs a grade, so a
summary that is not good scores 0.5 × (key facts found / 5) − 0.1 per wrong fact − 0.2 when its length is outside
the concise range (at most 0.5, so good = score 1.0, `--good-score 1`). The article is found by its prompt among
the articles bench/iterate_defaults.py writes (1,000 training, seed 1000; 200 held-out, seed 0).
"""

from __future__ import annotations

from examples.news_demo import news
from examples.news_demo.judge import judge_summary

TRAIN = news.generate_articles(1000, seed=1000, split="train")
HELDOUT = news.generate_articles(200, seed=0, split="heldout")
ARTICLES = {news.make_prompt(a): a for a in TRAIN + HELDOUT}


def score(prompt: str, answer: str) -> float:
    verdict = judge_summary(ARTICLES[prompt], answer.strip())
    if verdict.good:
        return 1.0
    missing = sum(r.startswith("missing") for r in verdict.reasons)
    wrong = sum(r.startswith("wrong") for r in verdict.reasons)
    return 0.5 * (5 - missing) / 5 - 0.1 * wrong - (0.0 if verdict.concise else 0.2)
