"""The reference cache: its key covers everything that changes the values beyond rounding, and a file with
impossible content (all zeros, the wrong count, non-finite or positive log-probs, unreadable) is never used."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

from preftune import TrainConfig, train
from preftune.data.tokenize import TokenizedPair
from preftune.errors import PreftuneError
from preftune.modeling.reference import cache_key, cache_problem
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
    base = dict(dtype="float32", mixed_precision="no", trust_remote_code=False)
    key = cache_key("model-a", _pairs([5, 6]), base)
    assert key == cache_key("model-a", _pairs([5, 6]), dict(base))  # deterministic
    others = [cache_key("model-b", _pairs([5, 6]), base),
              cache_key("model-a", _pairs([5, 7]), base),
              cache_key("model-a", _pairs([5, 6, 6]), base),
              cache_key("model-a", _pairs([5, 6]), {**base, "dtype": "bfloat16"}),
              cache_key("model-a", _pairs([5, 6]), {**base, "mixed_precision": "bf16"}),
              cache_key("model-a", _pairs([5, 6]), {**base, "trust_remote_code": True})]
    assert len({key, *others}) == 7
    # the boundary between prompt and answer is part of the key: [1,2]+[3] is not [1]+[2,3]
    a = [TokenizedPair([1, 2], [3], [4], 0)]
    b = [TokenizedPair([1], [2, 3], [4], 0)]
    assert cache_key("m", a, base) != cache_key("m", b, base)


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
    import preftune.scoring as scoring

    real = scoring.score

    def nan_score(*a, **k):
        out = real(*a, **k)
        out.rejected_logps = out.rejected_logps.clone()
        out.rejected_logps[3] = float("nan")
        return out

    monkeypatch.setattr(scoring, "score", nan_score)
    with pytest.raises(PreftuneError, match=r"non-finite log-probs for 1 pairs \(e.g. examples \[\d+\]\); load it in "
                                            r"float32 or bfloat16"):
        train(_cfg(tiny_model_dir, pairs_file, tmp_path / "run"))
    assert list((tmp_path / "run" / "reference_logps").glob("*")) == []
