"""The demo's base: the tokenizer, and that the committed build script still builds the shipped model."""

from __future__ import annotations

import dataclasses
import json

import pytest

from examples.news_demo import news
from examples.news_demo.base import (
    ASSETS_BASE,
    BaseRecipe,
    build_base,
    build_tokenizer,
    check_base,
    corpus,
)
from preftune.errors import PreftuneError


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(corpus(news.generate_articles(50, seed=0)))


def test_tokenizer_words_are_tokens_and_text_round_trips(tokenizer):
    art = news.generate_articles(1, seed=1, split="heldout")[0]
    ids = tokenizer(art.reference)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id  # BOS in front, as the models were trained
    # "Org Name will verb N what in Place , it said on Month D ." : one token per word and mark.
    assert len(ids) == 1 + len(art.reference.replace(",", " ,").replace(".", " .").split())
    assert tokenizer.decode(ids, skip_special_tokens=True) == art.reference
    assert tokenizer.unk_token_id not in tokenizer(news.make_prompt(art))["input_ids"]


def test_vocabulary_does_not_depend_on_the_sample(tokenizer):
    """The lexicon holds every word, so 50 or 500 articles give the same vocabulary (691 words + 4 specials)."""
    bigger = build_tokenizer(corpus(news.generate_articles(500, seed=3)))
    assert set(bigger.get_vocab()) == set(tokenizer.get_vocab())
    assert len(tokenizer) == 695


def test_shipped_base_is_small_safetensors_with_the_demo_vocabulary(tokenizer):
    check_base(ASSETS_BASE)
    size = sum(p.stat().st_size for p in ASSETS_BASE.iterdir())
    assert size < 20 * 2**20
    shipped_vocab = json.loads((ASSETS_BASE / "tokenizer.json").read_text())["model"]["vocab"]
    assert set(shipped_vocab) == set(tokenizer.get_vocab())


def test_check_base_names_the_missing_files(tmp_path):
    with pytest.raises(PreftuneError, match="missing config.json, model.safetensors, tokenizer.json"):
        check_base(tmp_path)


def test_build_script_still_builds_an_equivalent_model(tmp_path):
    """A shortened build has the shipped config and vocabulary, and its SFT loss falls from the uniform
    ln(695) = 6.54 nats per token of a fresh model to below 5.5 within the first stage's 12 steps (measured:
    6.53 → 5.03 mean of the last three)."""
    recipe = BaseRecipe.quick()
    out = build_base(tmp_path / "base", recipe, work_dir=tmp_path / "work", progress=False, say=lambda _: None)
    built, shipped = (json.loads((d / "config.json").read_text()) for d in (out, ASSETS_BASE))
    for key in ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "tie_word_embeddings", "bos_token_id",
                "eos_token_id", "pad_token_id"):
        assert built[key] == shipped[key], key
    vocab = lambda d: set(json.loads((d / "tokenizer.json").read_text())["model"]["vocab"])  # noqa: E731
    assert vocab(out) == vocab(ASSETS_BASE)
    rows = [json.loads(line)
            for line in (tmp_path / "work" / "sft_briefs" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["split"] == "train"]
    assert losses[0] == pytest.approx(6.55, abs=0.15)
    assert sum(losses[-3:]) / 3 < 5.5
    assert json.loads((out / "recipe.json").read_text()) == dataclasses.asdict(recipe)


def test_the_library_package_holds_no_demo_weights():
    """The base lives beside the demo, outside preftune/, so `pip install preftune` ships no weights (issue 11)."""
    package = ASSETS_BASE.parents[3] / "preftune"
    assert (package / "__init__.py").is_file()
    heavy = [p for p in package.rglob("*") if p.is_file() and (p.suffix in (".safetensors", ".bin", ".pt")
                                                               or p.stat().st_size > 200_000)]
    assert heavy == []
