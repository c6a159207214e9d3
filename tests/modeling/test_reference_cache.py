"""The reference cache: its key covers everything that changes the values beyond rounding (edited data gets fresh
log-probs), and a file with impossible content (all zeros, the wrong count, non-finite or positive log-probs,
unreadable) is never used."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import make_pairs, write_jsonl
from safetensors.torch import save_file

from preftune import TrainConfig, train
from preftune.data.tokenize import TokenizedPair
from preftune.errors import PreftuneError
from preftune.logprobs import ForwardPlan
from preftune.modeling.reference import ReferenceSettings, cache_key, cache_problem, cache_settings
from preftune.outputs.metrics import read_metrics

N = 4
GOOD = {"chosen": -torch.arange(1.0, N + 1), "rejected": -torch.arange(2.0, N + 2)}


@pytest.mark.parametrize("tensors, problem", [
    (GOOD, None),
    ({"chosen": torch.zeros(N), "rejected": torch.zeros(N)}, "it holds only zeros"),
    ({"chosen": GOOD["chosen"][:3], "rejected": GOOD["rejected"]}, "it holds (3,) chosen values for 4 pairs"),
    ({"chosen": GOOD["chosen"], "rejected": torch.tensor([-1.0, float("nan"), -2, -3])},
     "its rejected values are not all finite numbers"),
    ({"chosen": torch.tensor([-1.0, 0.5, -2, -3]), "rejected": GOOD["rejected"]},
     "it holds positive chosen log-probabilities"),
    ({"chosen": GOOD["chosen"]}, "it holds ['chosen'] instead of chosen, rejected (and scored)"),
    ({"chosen": GOOD["chosen"].long(), "rejected": GOOD["rejected"]}, "its chosen values are not all finite numbers"),
])
def test_cache_problem(tensors, problem):
    assert cache_problem(tensors, N) == problem


def _pairs(ids):
    return [TokenizedPair([1, 2], [3, i], [4, i], k) for k, i in enumerate(ids)]


def test_cache_key_covers_what_changes_the_values():
    """Any one id of any side, the prompt/answer boundary, the order and count of pairs, the model, the dtype, the
    autocast, remote code and (cache_settings puts it there in half precision) the forward path change the key;
    the same inputs, in any order of settings, give the same one."""
    base = dict(dtype="float32", mixed_precision="no", trust_remote_code=False)
    key = cache_key("model-a", _pairs([5, 6]), base)
    assert key == cache_key("model-a", _pairs([5, 6]), dict(reversed(base.items())))  # deterministic
    variants = [
        [TokenizedPair([1, 2], [3, 5], [4, 6], 0), TokenizedPair([1, 2], [3, 6], [4, 7], 1)],  # rejected
        [TokenizedPair([1, 2], [3, 5], [4, 5], 0), TokenizedPair([1, 2], [3, 7], [4, 6], 1)],  # chosen
        [TokenizedPair([1, 3], [3, 5], [4, 5], 0), TokenizedPair([1, 2], [3, 6], [4, 6], 1)],  # prompt
        [TokenizedPair([1], [2, 3, 5], [4, 5], 0), TokenizedPair([1, 2], [3, 6], [4, 6], 1)],  # a moved boundary
        _pairs([5, 6])[::-1], _pairs([5]), _pairs([5, 6, 6]),                                  # order, count
    ]
    others = [cache_key("model-a", v, base) for v in variants]
    others += [cache_key("model-b", _pairs([5, 6]), base)] + [
        cache_key("model-a", _pairs([5, 6]), {**base, **change}) for change in
        ({"dtype": "bfloat16"}, {"mixed_precision": "bf16"}, {"trust_remote_code": True}, {"forward": "cache"})]
    assert len({key, *others}) == len(others) + 1


@pytest.mark.parametrize("dtype, mixed_precision, by_path", [
    ("float32", "no", False), ("bfloat16", "no", True), ("float32", "bf16", True), ("float16", "no", True)])
def test_cache_settings_name_the_forward_path_only_in_half_precision(dtype, mixed_precision, by_path):
    """In bf16 the KV-cache and packed paths differ by up to 2.3e-2 per sequence (a cache from the other path
    makes step-1 rewards non-zero), so the path is part of the key there; in fp32 they agree to ~1e-6 and a
    resume that changes --prefix-sharing reuses the cache."""
    settings = ReferenceSettings.of(TrainConfig(dtype=dtype, mixed_precision=mixed_precision))
    cache, packed = ForwardPlan("cache"), ForwardPlan("packed", attention="sdpa")
    assert (settings.cache_settings(cache) != settings.cache_settings(packed)) is by_path
    assert settings.cache_settings(packed) == cache_settings(ForwardPlan("packed", chunk_size=64, attention="sdpa"),
                                                             dtype=dtype, mixed_precision=mixed_precision,
                                                             trust_remote_code=False)


def _cfg(model, data, out, **kw) -> TrainConfig:
    base = dict(model=str(model), data=str(data), output_dir=str(out), max_steps=1, batch_size=4, progress=False,
                max_length=64, max_prompt_length=32, reference="precomputed")
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("spoil, said", [
    (lambda f, n: save_file({"chosen": torch.zeros(n), "rejected": torch.zeros(n)}, str(f)), "it holds only zeros"),
    (lambda f, n: save_file({"chosen": -torch.ones(n - 1), "rejected": -torch.ones(n - 1)}, str(f)),
     "values for 64 pairs"),
    (lambda f, n: f.write_bytes(f.read_bytes()[:50]), "it is unreadable"),
], ids=["zeros", "wrong-count", "truncated"])
def test_impossible_cache_is_recomputed(tiny_model_dir, pairs_file, tmp_path, capsys, spoil, said):
    """A planted all-zero cache under the normal key (what --eval-batch-size -1 used to store) is not used: the
    first step's loss is ln 2 = 0.693147 (policy == reference, every log-ratio 0), which a zero reference would
    break (the log-ratios would be the policy's own log-probs, tens of nats)."""
    out = tmp_path / "run"
    train(_cfg(tiny_model_dir, pairs_file, out))
    cache = next((out / "reference_logps").glob("train-*.safetensors"))
    spoil(cache, 64)
    capsys.readouterr()
    train(_cfg(tiny_model_dir, pairs_file, out, overwrite=True))
    printed = capsys.readouterr().out
    assert f"reference cache {cache.name} is unusable (" in printed and said in printed and "computing it again" in printed
    assert read_metrics(out)[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    from safetensors.torch import load_file

    assert cache_problem(load_file(str(cache)), 64) is None  # replaced by a plausible one


def test_non_finite_reference_is_refused_not_stored(tiny_model_dir, pairs_file, tmp_path, monkeypatch):
    import preftune.modeling.precomputed as precomputed
    import preftune.scoring as scoring

    real = scoring.score

    def nan_score(*a, **k):
        out = real(*a, **k)
        out.rejected_logps = out.rejected_logps.clone()
        out.rejected_logps[3] = float("nan")
        return out

    monkeypatch.setattr(precomputed, "score", nan_score)
    with pytest.raises(PreftuneError, match=r"non-finite log-probs for 1 pairs \(e.g. examples \[\d+\]\); load it in "
                                            r"float32 or bfloat16"):
        train(_cfg(tiny_model_dir, pairs_file, tmp_path / "run"))
    assert list((tmp_path / "run" / "reference_logps").glob("*")) == []


@pytest.mark.parametrize("field", ["prompt", "chosen", "rejected"])
def test_edited_data_gets_fresh_reference_logps(tiny_model_dir, tmp_path, field):
    """Run once, edit one field of every row (same row count, same run folder), run again: at step 1 the
    policy is the reference, so with reference log-probs of the *current* token ids every implicit reward
    β·(log π − log π_ref) is 0 (fp32 noise ~1e-7) and the loss is ln 2. Stale log-probs of the old answers
    would give rewards of β times the change in log-prob (several nats here, so ~0.1 or more). (Issue 16: a key
    that left out the rejected answers reused stale reference log-probs after they were edited.)"""
    rows = make_pairs(8, seed=31)
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "run"
    kw = dict(batch_size=8, learning_rate=1e-3, warmup_ratio=0.0, seed=3)
    train(_cfg(tiny_model_dir, data, out, **kw))
    edited = [{**r, field: r[field].replace(" answer:", " reply:") if field == "prompt"
               else r[field] + " river stone"} for r in rows]
    write_jsonl(data, edited)
    train(_cfg(tiny_model_dir, data, out, overwrite=True, **kw))
    first = read_metrics(out)[0]
    for key in ("rewards/chosen", "rewards/rejected", "kl"):
        assert first[key] == pytest.approx(0.0, abs=1e-5), key
    assert len(list((out / "reference_logps").glob("train-*.safetensors"))) == 2
