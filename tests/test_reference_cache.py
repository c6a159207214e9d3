"""The precomputed reference cache is reused only for the exact same token ids (issue 16: a key that left out
the rejected answers reused stale reference log-probs after the rejected answers were edited)."""

from __future__ import annotations

import pytest
from helpers import make_pairs, write_jsonl

from preftune import TrainConfig, train
from preftune.data.tokenize import TokenizedPair
from preftune.modeling.reference import cache_key
from preftune.outputs.metrics import read_metrics


def _cfg(model, data, out, **kw) -> TrainConfig:
    base = dict(model=str(model), data=str(data), output_dir=str(out), max_steps=1, batch_size=8,
                learning_rate=1e-3, warmup_ratio=0.0, progress=False, seed=3, max_length=64, max_prompt_length=32,
                reference="precomputed")
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("field", ["prompt", "chosen", "rejected"])
def test_edited_data_gets_fresh_reference_logps(tiny_model_dir, tmp_path, field):
    """Run once, edit one field of every row (same row count, same run folder), run again: at step 1 the
    policy is the reference, so with reference log-probs of the *current* token ids every implicit reward
    β·(log π − log π_ref) is 0 (fp32 noise ~1e-7) and the loss is ln 2. Stale log-probs of the old answers
    would give rewards of β times the change in log-prob (several nats here, so ~0.1 or more)."""
    rows = make_pairs(8, seed=31)
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "run"
    train(_cfg(tiny_model_dir, data, out))
    edited = [{**r, field: r[field].replace(" answer:", " reply:") if field == "prompt"
               else r[field] + " river stone"} for r in rows]
    write_jsonl(data, edited)
    train(_cfg(tiny_model_dir, data, out, overwrite=True))
    first = read_metrics(out)[0]
    for key in ("rewards/chosen", "rewards/rejected", "kl"):
        assert first[key] == pytest.approx(0.0, abs=1e-5), key
    assert len(list((out / "reference_logps").glob("train-*.safetensors"))) == 2


def test_cache_key_covers_every_token_id_and_the_precision():
    """Changing any one id of any side, the order of pairs, the model or the precision changes the key;
    the same inputs give the same key."""
    pairs = [TokenizedPair([1, 2], [3, 4], [5, 6], 0), TokenizedPair([7], [8], [9, 10], 1)]
    extra = {"dtype": "float32", "mixed_precision": "no"}
    key = cache_key("m", pairs, extra)
    assert cache_key("m", [TokenizedPair(list(p.prompt_ids), list(p.chosen_ids), list(p.rejected_ids), p.index)
                           for p in pairs], dict(extra)) == key
    variants = [
        [TokenizedPair([1, 2], [3, 4], [5, 6], 0), TokenizedPair([7], [8], [9, 11], 1)],   # rejected
        [TokenizedPair([1, 2], [3, 4], [5, 6], 0), TokenizedPair([7], [12], [9, 10], 1)],  # chosen
        [TokenizedPair([1, 13], [3, 4], [5, 6], 0), TokenizedPair([7], [8], [9, 10], 1)],  # prompt
        [TokenizedPair([1, 2], [3], [4, 5, 6], 0), TokenizedPair([7], [8], [9, 10], 1)],   # a moved boundary
        pairs[::-1],                                                                       # order
        pairs[:1],                                                                         # count
    ]
    keys = {cache_key("m", v, extra) for v in variants}
    keys |= {cache_key("other", pairs, extra), cache_key("m", pairs, {**extra, "dtype": "bfloat16"}),
             cache_key("m", pairs, {**extra, "mixed_precision": "bf16"})}
    assert key not in keys and len(keys) == len(variants) + 3


def test_cache_key_does_not_depend_on_the_order_of_settings():
    pairs = [TokenizedPair([1], [2], [3], 0)]
    assert cache_key("m", pairs, {"dtype": "float32", "mixed_precision": "no"}) == \
        cache_key("m", pairs, {"mixed_precision": "no", "dtype": "float32"})
