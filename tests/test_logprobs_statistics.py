"""The per-sequence statistics a plan may ask for beyond the summed log-probs (logprobs.STATISTICS): LD-DPO's
shared-length sums and WPO's aligned sums, on every forward path, against one unpadded row per answer with the
model's own full logits in float64 (the probabilities themselves, not logsumexp identities); the shared sums'
gradients equal the plain path's; WPO's carry none; nothing is computed unless asked.
"""

from __future__ import annotations

import pytest
import torch
from helpers import make_pairs

from preftune.data.collate import collate
from preftune.data.encode import tokenize_records
from preftune.logprobs import ForwardPlan, LogpsModel, forward_logps, statistics_only
from preftune.modeling.load import load_model_and_tokenizer

BOTH = frozenset({"shared", "aligned"})
PATHS = [dict(path="off", chunk_size=0), dict(path="off", chunk_size=7), dict(path="cache", chunk_size=3),
         dict(path="cache", chunk_size=0), dict(path="packed", chunk_size=5, attention="sdpa"),
         dict(path="packed", chunk_size=4, rows="packed", attention="sdpa"),
         dict(path="packed", chunk_size=0, attention="eager")]


@pytest.fixture(scope="module")
def model_and_batch(tiny_model_dir):
    model, tok = load_model_and_tokenizer(str(tiny_model_dir))
    texts = [(p["prompt"], p["chosen"], p["rejected"]) for p in make_pairs(5, seed=11)]
    texts[1] = (texts[1][0], " yes", texts[1][2])  # a short chosen answer: ℓ = its length (2 with EOS)
    texts[3] = (texts[3][0], texts[3][1], " no")  # a short rejected one
    pairs, _ = tokenize_records(tok, texts, max_length=64, max_prompt_length=32)
    return model, collate(pairs, range(len(pairs)), tok.pad_token_id)


def _rows(model, batch):
    """Per answer: (per-token log p, per-token log p − log Σ_v p²) in float64 from one unpadded row each."""
    out = {}
    for side in ("chosen", "rejected"):
        ids, mask = getattr(batch, f"{side}_ids"), getattr(batch, f"{side}_mask")
        for i in range(len(batch)):
            p = batch.prompt_ids[i][batch.prompt_mask[i].bool()].tolist()
            a = ids[i][mask[i].bool()].tolist()
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([p + a])).logits[0, len(p) - 1:-1].double()
            probs = torch.softmax(logits, -1)
            tok = torch.log(probs[torch.arange(len(a)), a])
            out[side, i] = (tok, tok - torch.log((probs ** 2).sum(-1)))
    return out


@pytest.mark.parametrize("path", PATHS, ids=lambda p: "-".join(f"{k}={v}" for k, v in p.items()))
def test_statistics_on_every_path(model_and_batch, path):
    """Shared: Σ of the first min(|c|, |r|) token log-probs of each answer; aligned: Σ_t log p(y_t) − log Σ_v p(v)²,
    both within 1e-4 of the float64 rows; the shared sums' gradients match the plain path's (1e-5 + 1e-4 rel)."""
    model, batch = model_and_batch
    rows = _rows(model, batch)

    def run(plan):
        model.zero_grad()
        out = forward_logps(model, batch, plan)
        (out.chosen_shared_logps.sum() - 0.5 * out.rejected_shared_logps.sum()).backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters()}

    out, grads = run(ForwardPlan(**path, statistics=BOTH))
    _, plain_grads = run(ForwardPlan("off", statistics={"shared"}))
    lc, lr = batch.chosen_mask.sum(-1), batch.rejected_mask.sum(-1)
    assert (lc < lr).any() and (lc > lr).any()  # ℓ is the chosen length in some pairs, the rejected in others
    for side in ("chosen", "rejected"):
        assert not getattr(out, f"{side}_aligned_logps").requires_grad
        for i in range(len(batch)):
            tok, aligned = rows[side, i]
            shared = int(min(lc[i], lr[i]))
            torch.testing.assert_close(getattr(out, f"{side}_shared_logps")[i].double(), tok[:shared].sum(),
                                       atol=1e-4, rtol=0)
            torch.testing.assert_close(getattr(out, f"{side}_aligned_logps")[i].double(), aligned.sum(),
                                       atol=1e-4, rtol=0)
            torch.testing.assert_close(getattr(out, f"{side}_logps")[i].double(), tok.sum(), atol=1e-4, rtol=0)
    for n in plain_grads:
        torch.testing.assert_close(grads[n], plain_grads[n], atol=1e-5, rtol=1e-4, msg=n)


def test_statistics_only_when_asked(model_and_batch):
    """No statistics by default; a reference pass on the policy's handle keeps only what it may use."""
    model, batch = model_and_batch
    with torch.no_grad():
        out = forward_logps(model, batch, ForwardPlan("cache", 8))
        assert out.chosen_shared_logps is None and out.rejected_aligned_logps is None
        handle = LogpsModel(model, ForwardPlan("cache", 8, statistics=BOTH))
        with statistics_only(handle, frozenset({"shared"})):
            out = handle(batch)
        assert out.chosen_shared_logps is not None and out.chosen_aligned_logps is None
        assert handle.plan.statistics == BOTH
    with pytest.raises(ValueError, match="statistics are among shared, aligned"):
        ForwardPlan(statistics={"entropy"})
