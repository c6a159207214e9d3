"""Which records evaluate (preftune.data.holdout): the settings' meaning, and the held-out share taken by whole
prompt groups in a seeded, order-independent rank."""

from __future__ import annotations

import numpy as np
import pytest

from preftune.data.holdout import HoldOut, _groups, held_out, prompt_ranks
from preftune.errors import PreftuneError


def _held(records: list[dict], fraction: float, seed: int) -> list[dict]:
    mask = held_out(np.frombuffer(prompt_ranks(records, seed), dtype="S32"), fraction)
    assert len(mask) == len(records)
    return [r for r, m in zip(records, mask) if m]


def test_held_out_is_deterministic_and_takes_whole_prompts():
    """40 records over 10 prompts (4 each); eval_fraction 0.2 -> 8 records = exactly 2 whole prompts."""
    records = [{"prompt": f"p{i % 10}", "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(40)]
    held = _held(records, 0.2, seed=1)
    prompts = {r["prompt"] for r in held}
    assert len(held) == 8 and len(prompts) == 2
    assert _held(records, 0.2, seed=1) == held
    assert {r["prompt"] for r in _held(records[::-1], 0.2, seed=1)} == prompts  # the record order does not matter
    assert {r["prompt"] for r in _held(records, 0.2, seed=2)} != prompts  # another seed, other prompts (here)
    with pytest.raises(PreftuneError, match="share one prompt"):
        _held([{"prompt": "same"}] * 5, 0.2, seed=0)


def test_conversational_prompts_group_by_their_messages():
    """9 records over 3 message-list prompts; 0.34 -> round(3.06) = 3 records: one whole prompt."""
    records = [{"prompt": [{"role": "user", "content": f"q{i % 3}"}]} for i in range(9)]
    held = _held(records, 0.34, seed=0)
    assert len(held) == 3 and len({r["prompt"][0]["content"] for r in held}) == 1


def test_groups_fit_the_target_else_the_smallest_and_never_all():
    assert _groups([2, 3, 1, 4], 3) == [0, 2]   # 2 fits, 3 would overflow, 1 fills the target
    assert _groups([5, 3, 4], 2) == [1]         # none fits: the smallest
    assert _groups([1, 1], 2) == [0]            # both would fit: never all


def test_the_settings_say_where_eval_comes_from():
    """eval_data wins over eval_fraction; eval_split alone reads another split of data; a fraction holds out of
    data with the seed; the cache key sees only what applies."""
    def fp(source):
        return f"fp({source})"

    other = HoldOut("d", eval_data="e", eval_fraction=0.3, seed=4)
    assert (other.source, other.fraction, other.rank_seed) == ("e", 0.0, None)
    assert other.ingredients(fp) == {"eval_data": "fp(e)", "eval_split": None, "eval_fraction": 0.0, "seed": None}
    split = HoldOut("d", eval_split="test")
    assert (split.source, split.fraction) == ("d", 0.0)
    assert split.ingredients(fp)["eval_data"] == "fp(d)"
    share = HoldOut("d", eval_fraction=0.25, seed=4)
    assert (share.source, share.fraction, share.rank_seed) == (None, 0.25, 4)
    assert share.ingredients(fp) == {"eval_data": None, "eval_split": None, "eval_fraction": 0.25, "seed": 4}
    assert HoldOut("d").source is None and HoldOut("d").fraction == 0.0
    mask, line = share.split(np.frombuffer(prompt_ranks([{"prompt": f"p{i}"} for i in range(8)], 4), dtype="S32"))
    assert int(mask.sum()) == 2 and line == "held out 2 of 8 for evaluation (eval_fraction 0.25)"
