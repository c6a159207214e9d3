"""Every forward path gives the plain path's log-probs and gradients (fp32, tiny Llama)."""

from __future__ import annotations

import pytest
import torch
from helpers import make_pairs

from preftune.data.collate import collate
from preftune.data.tokenize import tokenize_records
from preftune.logprobs import forward_logps
from preftune.modeling.load import load_model_and_tokenizer
from preftune.scoring import score_completions, score_records

PATHS = [
    dict(prefix_sharing=True, chunk_size=1024),
    dict(prefix_sharing=True, chunk_size=3),   # many small chunks
    dict(prefix_sharing=False, chunk_size=7),
    dict(prefix_sharing=True, chunk_size=0),   # shared prefix with full logits
]


@pytest.fixture(scope="module")
def model_and_batch(tiny_model_dir):
    model, tok = load_model_and_tokenizer(str(tiny_model_dir))
    texts = [(p["prompt"], p["chosen"], p["rejected"]) for p in make_pairs(6, seed=5)]
    pairs, _ = tokenize_records(tok, texts, max_length=64, max_prompt_length=32)
    return model, tok, collate(pairs, range(len(pairs)), tok.pad_token_id)


def _manual_logps(model, tok, prompt_ids, answer_ids):
    """Independent reference: one unpadded row, full logits, log_softmax, sum over the answer."""
    ids = torch.tensor([prompt_ids + answer_ids])
    logits = model(input_ids=ids).logits[0, :-1].float()
    lp = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
    return lp[len(prompt_ids) - 1:].sum()


def test_plain_full_logits_matches_unpadded_rows(model_and_batch):
    model, tok, batch = model_and_batch
    out = forward_logps(model, batch, prefix_sharing=False, chunk_size=0)
    for i in range(len(batch)):
        p = batch.prompt_ids[i][batch.prompt_mask[i].bool()].tolist()
        c = batch.chosen_ids[i][batch.chosen_mask[i].bool()].tolist()
        r = batch.rejected_ids[i][batch.rejected_mask[i].bool()].tolist()
        torch.testing.assert_close(out.chosen_logps[i], _manual_logps(model, tok, p, c), atol=1e-4, rtol=0)
        torch.testing.assert_close(out.rejected_logps[i], _manual_logps(model, tok, p, r), atol=1e-4, rtol=0)
        assert out.chosen_lengths[i] == len(c)


@pytest.mark.parametrize("path", PATHS, ids=lambda p: f"prefix{int(p['prefix_sharing'])}-chunk{p['chunk_size']}")
def test_paths_match_plain_values_and_gradients(model_and_batch, path):
    model, _, batch = model_and_batch

    def run(**kw):
        model.zero_grad()
        out = forward_logps(model, batch, **kw)
        (out.chosen_logps.sum() - 0.5 * out.rejected_logps.sum()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        return out, grads

    ref, ref_grads = run(prefix_sharing=False, chunk_size=0)
    out, grads = run(**path)
    torch.testing.assert_close(out.chosen_logps, ref.chosen_logps, atol=1e-4, rtol=0)
    torch.testing.assert_close(out.rejected_logps, ref.rejected_logps, atol=1e-4, rtol=0)
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], atol=1e-5, rtol=1e-4, msg=n)


def test_sft_batch_has_no_rejected(model_and_batch):
    model, tok, _ = model_and_batch
    pairs, _ = tokenize_records(tok, [("question: red answer:", " yes good cat")], max_length=64, max_prompt_length=32)
    batch = collate(pairs, [0], tok.pad_token_id)
    out = forward_logps(model, batch)
    assert out.rejected_logps is None
    p, c = pairs[0].prompt_ids, pairs[0].chosen_ids
    torch.testing.assert_close(out.chosen_logps[0], _manual_logps(model, tok, p, c), atol=1e-4, rtol=0)


def test_score_records_and_completions_keep_input_order(model_and_batch):
    model, tok, batch = model_and_batch
    records = make_pairs(6, seed=5)
    scored = score_records(model, tok, records, max_length=64, max_prompt_length=32, batch_size=4)
    assert scored["kept"] == list(range(6))
    with torch.no_grad():
        direct = forward_logps(model, batch)
    torch.testing.assert_close(scored["chosen_logps"], direct.chosen_logps, atol=1e-4, rtol=0)
    logps, n = score_completions(model, tok, [r["prompt"] for r in records], [r["rejected"] for r in records],
                                 batch_size=4)
    torch.testing.assert_close(logps, direct.rejected_logps, atol=1e-4, rtol=0)
    torch.testing.assert_close(n, direct.rejected_lengths)
