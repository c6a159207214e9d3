"""The scoring loop (length-sorted batches → forward → per-pair log-probs in input order) against one unpadded
row per answer with the model's own full logits and token ids from the tokenizer alone (tests/independent.py).

Replaces the circular check in tests/test_logprobs.py that compared score_records with forward_logps."""

from __future__ import annotations

import pytest
import torch
from helpers import make_pairs
from independent import hand_ids, row_logp

from preftune.scoring import score_ids, score_records

# fp32 sums of ~10 token log-probs (about -60 each) computed in padded, length-sorted batches vs alone:
# measured up to 4e-6 apart; 1e-4 is far above that and far below a swapped pair or a lost token (> 1).
ATOL = 1e-4


@pytest.fixture(scope="module")
def model_tok(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(tiny_model_dir)


def test_score_records_in_input_order(model_tok):
    """7 records of different lengths in batches of 3: sorting by length reorders them, the result must not."""
    model, tok = model_tok
    records = make_pairs(7, seed=5)
    got = score_records(model, tok, records, max_length=64, max_prompt_length=32, batch_size=3)
    assert got["kept"] == list(range(7))
    with torch.no_grad():
        for i, r in enumerate(records):
            for side in ("chosen", "rejected"):
                p, a = hand_ids(tok, r["prompt"], r[side])
                want = row_logp(model, p, a)
                assert float(got[f"{side}_logps"][i]) == pytest.approx(float(want), abs=ATOL), (i, side)
                assert got[f"{side}_lengths"][i] == len(a)


def test_score_ids_in_input_order(model_tok):
    """Completions given as token ids (a model's own samples) after their prompts' ids, in batches of 2 whose
    length sorting reorders them: each equals its own unpadded row."""
    model, tok = model_tok
    rows = [hand_ids(tok, r["prompt"], r["chosen"]) for r in make_pairs(5, seed=6)]
    logps, lengths = score_ids(model, [p for p, _ in rows], [a for _, a in rows], pad_id=tok.pad_token_id,
                               batch_size=2)
    with torch.no_grad():
        for i, (p, a) in enumerate(rows):
            assert float(logps[i]) == pytest.approx(float(row_logp(model, p, a)), abs=ATOL), i
            assert lengths[i] == len(a)
