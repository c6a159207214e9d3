"""The synthetic news generator: determinism, the held-out split, the facts, and the bad-summary rules."""

from __future__ import annotations

import random
import re
from collections import Counter

import pytest

from examples.news_demo import news
from preftune.errors import PreftuneError


def test_same_seed_same_articles_and_prefix_property():
    a = [x.to_dict() for x in news.generate_articles(40, seed=3)]
    b = [x.to_dict() for x in news.generate_articles(40, seed=3)]
    assert a == b
    # Articles are drawn one at a time, so a shorter call is a prefix of a longer one.
    assert [x.to_dict() for x in news.generate_articles(10, seed=3)] == a[:10]
    other = [x.to_dict() for x in news.generate_articles(40, seed=4)]
    assert sum(x["text"] == y["text"] for x, y in zip(a, other)) == 0


def test_heldout_pairs_are_new_combinations_of_known_parts():
    """No (org, place) pair of any held-out article occurs in training, for any pair of seeds; yet
    every organisation and every place of the held-out set also appears in training (32 x 32 parts)."""
    train = news.generate_articles(3000, seed=0, split="train") + news.generate_articles(500, seed=9, split="train")
    held = news.generate_articles(400, seed=0, split="heldout") + news.generate_articles(200, seed=7, split="heldout")
    pair = lambda a: (a.facts["org"], a.facts["place"])  # noqa: E731
    train_pairs, held_pairs = {pair(a) for a in train}, {pair(a) for a in held}
    assert not train_pairs & held_pairs
    assert all(news.split_of(*p) == "heldout" for p in held_pairs)
    assert {o for o, _ in held_pairs} <= {o for o, _ in train_pairs}
    assert {p for _, p in held_pairs} <= {p for _, p in train_pairs}
    # One pair in five is held out (CRC mod 5): 1024 pairs, so about 205.
    n_held = sum(news.split_of(o, p) == "heldout" for o in news.ORGS for p in news.PLACES)
    assert 150 < n_held < 260


def test_article_lead_holds_the_facts_and_filler_the_distractors():
    for art in news.generate_articles(200, seed=1):
        lead, *paragraphs = art.text.split("\n\n")
        f = art.facts
        assert len(paragraphs) == 3 and len(art.filler) == 6
        for key in ("org", "verb", "what", "number", "place", "date"):
            assert re.search(rf"\b{re.escape(f[key])}\b", lead), (key, lead)
        filler = " ".join(paragraphs)
        assert re.search(rf"\b{f['distractor_number']}\b", filler) and f["distractor_place"] in filler
        assert f["number"] != f["distractor_number"] and f["place"] != f["distractor_place"]
        assert 30 <= int(f["number"]) <= 990 and 1 <= int(f["day"]) <= 28
        assert art.reference == (f"{f['org']} will {f['verb']} {f['number']} {f['what']} in {f['place']}, "
                                 f"it said on {f['date']}.")


def test_articles_vary_across_topics_orgs_places_and_numbers():
    arts = news.generate_articles(1000, seed=2)
    assert {a.topic for a in arts} == set(news.TOPIC_NAMES)
    assert len({a.facts["org"] for a in arts}) == len(news.ORGS)
    assert len({a.facts["place"] for a in arts}) == len(news.PLACES)
    assert len({a.facts["number"] for a in arts}) > 100
    assert len({a.text for a in arts}) == 1000


def test_bad_summaries_follow_their_rules():
    rng = random.Random(0)
    for art in news.generate_articles(100, seed=5):
        f = art.facts
        lo, hi = art.length_range
        verbose = news.bad_summary(art, "verbose", rng)
        assert verbose.startswith(art.reference) and news.count_words(verbose) > hi
        vague = news.bad_summary(art, "vague", rng)
        assert not any(f[k] in vague for k in ("org", "number", "place", "date"))
        wrong = news.bad_summary(art, "wrong_fact", rng)
        assert f["distractor_number"] in wrong and f"{f['number']} " not in wrong
        copied = news.bad_summary(art, "copied_filler", rng)
        assert copied in art.filler and f["distractor_number"] in copied
    with pytest.raises(PreftuneError, match="bad summary kind"):
        news.bad_summary(art, "rude", rng)


def test_generate_refuses_unknown_split_and_negative_count():
    with pytest.raises(PreftuneError, match="split"):
        news.generate_articles(3, split="test")
    with pytest.raises(PreftuneError, match=">= 0"):
        news.generate_articles(-1)


def test_style_weights_and_sft_mixture_favour_bad_summaries():
    """Good-topics (3 of 8): good 0.7, each bad kind 0.3/4 = 0.075. Bad topics (5 of 8): the house kind 0.7,
    good 0.15, the other three kinds 0.15/3 = 0.05. Overall good share = 3/8*0.7 + 5/8*0.15 = 0.35625."""
    w = news.style_weights("energy")
    assert w["good"] == pytest.approx(0.7) and w["vague"] == pytest.approx(0.075)
    w = news.style_weights("health")
    assert (w["verbose"], w["good"], w["vague"]) == pytest.approx((0.7, 0.15, 0.05))
    assert all(sum(news.style_weights(t).values()) == pytest.approx(1.0) for t in news.TOPIC_NAMES)
    records = news.build_sft_records(news.generate_articles(4000, seed=0), seed=0)
    share = Counter(r["style"] for r in records)["good"] / len(records)
    assert share == pytest.approx(0.35625, abs=0.03)
    assert records == news.build_sft_records(news.generate_articles(4000, seed=0), seed=0)
    art = news.generate_articles(1)[0]
    assert records[0]["prompt"] == news.make_prompt(art) and records[0]["prompt"].endswith("Summary:")


def test_preference_records_prefer_the_reference_and_draw_bad_kinds_by_desk():
    """The rejected kind is drawn from the desk's bad-style weights: deterministic per seed, every kind used."""
    arts = news.generate_articles(400, seed=1)
    recs = news.build_preference_records(arts, seed=1)
    assert recs == news.build_preference_records(arts, seed=1)
    assert {r["kind"] for r in recs} == set(news.BAD_KINDS)
    for art, r in zip(arts, recs):
        assert r["chosen"] == " " + art.reference and r["rejected"] != r["chosen"]
        assert r["prompt"] == news.make_prompt(art)


def test_lexicon_covers_every_word_the_generator_writes():
    words = {w for line in news.lexicon() for w in re.findall(r"\w+|[^\w\s]+", line)}
    rng = random.Random(0)
    for art in news.generate_articles(300, seed=4) + news.generate_articles(100, seed=4, split="heldout"):
        for text in [news.make_prompt(art), art.reference] + [news.bad_summary(art, k, rng) for k in news.BAD_KINDS]:
            assert set(re.findall(r"\w+|[^\w\s]+", text)) <= words


def test_article_from_prompt_reads_back_every_fact_of_every_lead_template():
    """A judge shown only the prompt (as `preftune pairs` shows it) gets the article back exactly: its facts
    (distractors included), reference, filler and split, for 225 articles of both splits (all three lead
    templates); anything else is a ValueError."""
    articles = news.generate_articles(150, seed=11, split="train") + news.generate_articles(75, seed=12,
                                                                                            split="heldout")
    leads = Counter(a.text.split("\n\n")[0].split(" ")[0] == "On" for a in articles)
    assert leads[True] > 40 and leads[False] > 100  # "On {date}, ..." and the two templates starting with {org}
    for a in articles:
        back = news.article_from_prompt(news.make_prompt(a))
        assert {**back.to_dict(), "id": a.id} == a.to_dict()
    with pytest.raises(ValueError, match="no news demo article in the prompt"):
        news.article_from_prompt("Summarize this: the cat sat on the mat.")
