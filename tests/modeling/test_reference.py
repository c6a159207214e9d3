"""Precomputed reference log-probs for exactly the pairs a run uses (preftune.modeling.reference.precompute):
scored on demand, extended by later runs, "not scored yet" explicit in the cache file."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

import preftune.modeling.precomputed as precomputed
import preftune.scoring as scoring
from preftune import TrainConfig, train
from preftune.data.batching import used_positions
from preftune.data.collate import collate
from preftune.data.splits import DataSettings, load_splits
from preftune.device import forward_handle
from preftune.modeling.load import load_model_and_tokenizer
from preftune.modeling.reference import cache_key, precompute


@pytest.fixture(scope="module")
def model_and_pairs(tiny_model_dir, pairs_file):
    model, tok = load_model_and_tokenizer(str(tiny_model_dir))
    model = forward_handle(model)
    cfg = TrainConfig(model=str(tiny_model_dir), data=str(pairs_file), output_dir="unused", progress=False,
                      max_length=64, max_prompt_length=32)
    train_split, _ = load_splits(DataSettings.of(cfg), tok, "dpo")
    return model, tok, train_split.pairs


@pytest.fixture
def scored_counts(monkeypatch):
    counts = []
    real = scoring.score

    def spy(model, pairs, **kw):
        counts.append(len(pairs))
        return real(model, pairs, **kw)

    monkeypatch.setattr(precomputed, "score", spy)
    return counts


def test_only_the_positions_asked_are_scored_and_a_later_call_extends(model_and_pairs, tmp_path, scored_counts):
    model, tok, pairs = model_and_pairs
    file = tmp_path / "ref.safetensors"
    kw = dict(cache_file=file, pad_id=tok.pad_token_id, batch_size=4)
    first = precompute(model, pairs, positions=[1, 5, 7], **kw)
    saved = load_file(str(file))
    assert saved["scored"].nonzero().flatten().tolist() == [1, 5, 7] and scored_counts == [3]
    assert saved["chosen"].isnan().sum() == len(pairs) - 3  # "not scored yet" is NaN and scored == 0
    second = precompute(model, pairs, positions=[1, 2, 9], **kw)
    assert scored_counts == [3, 2]  # only 2 and 9 were new
    assert load_file(str(file))["scored"].nonzero().flatten().tolist() == [1, 2, 5, 7, 9]
    assert second.chosen[1] == first.chosen[1] and second.rejected[5] == first.rejected[5]  # read back, unchanged
    full = precompute(model, pairs, cache_file=tmp_path / "all.safetensors", pad_id=tok.pad_token_id, batch_size=8)
    # other batch compositions and padding round fp32 sums differently (~1e-7 on the tiny model); 1e-5 is far
    # below what scoring the wrong pair would change (log-probs here differ by ~1 between pairs)
    for i in (1, 2, 5, 7, 9):
        assert second.chosen[i].item() == pytest.approx(full.chosen[i].item(), abs=1e-5)
        assert second.rejected[i].item() == pytest.approx(full.rejected[i].item(), abs=1e-5)
    batch = collate([pairs[i] for i in (2, 3)], [2, 3], tok.pad_token_id)
    with pytest.raises(RuntimeError, match=r"positions \[3\] were not precomputed"):
        second.logps(batch)


def test_a_cache_file_without_scored_is_complete(model_and_pairs, tmp_path, scored_counts):
    """Files written before "scored" existed hold every pair: they are read back whole, nothing rescored."""
    from safetensors.torch import save_file

    model, tok, pairs = model_and_pairs
    file = tmp_path / "old.safetensors"
    save_file({"chosen": -torch.arange(len(pairs)).float(), "rejected": torch.zeros(len(pairs))}, str(file))
    ref = precompute(model, pairs, cache_file=file, pad_id=tok.pad_token_id, batch_size=4, positions=[3, 4])
    assert scored_counts == [] and ref.chosen[4].item() == -4.0 and bool(ref.scored.all())


def test_cache_key_follows_the_token_ids(model_and_pairs):
    """Same ids, same key (a view or a list of the same pairs); one id changed, another key."""
    _, _, pairs = model_and_pairs
    assert cache_key("m", pairs, {}) == cache_key("m", pairs.subset(range(len(pairs))), {})
    as_list = list(pairs)
    assert cache_key("m", as_list, {}) == cache_key("m", list(as_list), {})
    changed = list(as_list)
    changed[7] = type(changed[7])(changed[7].prompt_ids, changed[7].chosen_ids[:-1] + [0], changed[7].rejected_ids, 7)
    assert cache_key("m", changed, {}) != cache_key("m", as_list, {})
    assert cache_key("m", pairs.subset([0, 1]), {}) != cache_key("m", pairs.subset([1, 0]), {})


def test_a_run_scores_exactly_the_pairs_its_steps_use(tiny_model_dir, pairs_file, tmp_path, monkeypatch):
    """2 steps of 4 pairs out of 64: the cache holds the 8 pairs of the sampler's first two global batches; a
    rerun with 5 steps adds the pairs of steps 3-5 and keeps the first 8 values as they were. The tokenized data
    is built once, staged outside the run folder, kept in its data_cache/, and reused by the rerun."""
    import preftune.data.splits as splits

    builds = []
    real = splits.build_entry
    monkeypatch.setattr(splits, "build_entry", lambda *a, **k: builds.append(1) or real(*a, **k))
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    out = tmp_path / "run"
    kw = dict(model=str(tiny_model_dir), data=str(pairs_file), output_dir=str(out), batch_size=4, progress=False,
              max_length=64, max_prompt_length=32, seed=3)
    res = train(TrainConfig(max_steps=2, **kw))
    file = next((out / "reference_logps").glob("train-*.safetensors"))
    tok = load_model_and_tokenizer(str(tiny_model_dir))[1]
    pairs = load_splits(DataSettings.of(TrainConfig(**kw)), tok, "dpo", cache_dir=out / "data_cache")[0].pairs  # the run's own
    batching = dict(batch_size=4, accumulation=1, seed=3, group_by_length=True)
    first = load_file(str(file))
    assert first["scored"].nonzero().flatten().tolist() == used_positions(pairs, 2, **batching).tolist()
    assert int(first["scored"].sum()) == 8 and res.steps == 2
    train(TrainConfig(max_steps=5, overwrite=True, **kw))
    second = load_file(str(file))
    assert second["scored"].nonzero().flatten().tolist() == used_positions(pairs, 5, **batching).tolist()
    assert int(second["scored"].sum()) == 20
    kept = first["scored"].bool()
    assert torch.equal(second["chosen"][kept], first["chosen"][kept])
    assert len(builds) == 1 and len(list((out / "data_cache").glob("*/meta.json"))) == 1
    assert not list((tmp_path / "tmp").iterdir())
    assert all(math.isfinite(v) for v in second["chosen"][second["scored"].bool()].tolist())
