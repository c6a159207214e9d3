"""Every forward path gives the plain path's log-probs and gradients (fp32, tiny Llama).

Tolerances: 1e-4 per sequence log-prob and 1e-5 (+1e-4 relative) per gradient entry, the issue's exactness
bar; the paths differ only in summation order and padding, which moves fp32 results by ~1e-6 here.
"""

from __future__ import annotations

import types

import pytest
import torch
from helpers import WORDS, make_pairs

from preftune import logprobs
from preftune.data.collate import collate
from preftune.data.encode import tokenize_records
from preftune.logprobs import ForwardPlan, forward_logps
from preftune.modeling.load import load_model_and_tokenizer

PLAIN = ForwardPlan("off", chunk_size=0)
PATHS = [
    dict(path="cache", chunk_size=1024),
    dict(path="cache", chunk_size=3),   # many small chunks
    dict(path="off", chunk_size=7),
    dict(path="cache", chunk_size=0),   # shared prefix with full logits
    dict(path="packed", chunk_size=1024, attention="sdpa"),             # one pair per row, sdpa 4D mask
    dict(path="packed", chunk_size=0, attention="sdpa"),                # packed with the model's full logits
    dict(path="packed", chunk_size=5, rows="packed", attention="sdpa"),  # whole batch in one row (document mask)
    dict(path="packed", chunk_size=4, keep_logits_mib=64, attention="sdpa"),  # head logits kept, not recomputed
]


def _path_id(p: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in p.items())


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
    out = forward_logps(model, batch, PLAIN)
    for i in range(len(batch)):
        p = batch.prompt_ids[i][batch.prompt_mask[i].bool()].tolist()
        c = batch.chosen_ids[i][batch.chosen_mask[i].bool()].tolist()
        r = batch.rejected_ids[i][batch.rejected_mask[i].bool()].tolist()
        torch.testing.assert_close(out.chosen_logps[i], _manual_logps(model, tok, p, c), atol=1e-4, rtol=0)
        torch.testing.assert_close(out.rejected_logps[i], _manual_logps(model, tok, p, r), atol=1e-4, rtol=0)
        assert out.chosen_lengths[i] == len(c)


def _values_and_grads(model, batch, plan):
    model.zero_grad()
    out = forward_logps(model, batch, plan)
    loss = out.chosen_logps.sum()
    if out.rejected_logps is not None:
        loss = loss - 0.5 * out.rejected_logps.sum()
    loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters()}


def _assert_same(out, grads, ref, ref_grads):
    torch.testing.assert_close(out.chosen_logps, ref.chosen_logps, atol=1e-4, rtol=0)
    if ref.rejected_logps is not None:
        torch.testing.assert_close(out.rejected_logps, ref.rejected_logps, atol=1e-4, rtol=0)
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], atol=1e-5, rtol=1e-4, msg=n)


@pytest.mark.parametrize("path", PATHS, ids=_path_id)
def test_paths_match_plain_values_and_gradients(model_and_batch, path):
    model, _, batch = model_and_batch
    ref, ref_grads = _values_and_grads(model, batch, PLAIN)
    _assert_same(*_values_and_grads(model, batch, ForwardPlan(**path)), ref, ref_grads)


@pytest.fixture(scope="module")
def uneven_batches(model_and_batch):
    """Pairs of very different lengths under truncation (max_length 24, max_prompt_length 23):
    a 30-word prompt cut to 23 tokens whose answers keep 1 token each (the prompt fills the row),
    a 2-word prompt with long answers cut to fit, and a middle one; plus the same as SFT examples."""
    _, tok, _ = model_and_batch
    long_text = " ".join(WORDS[i % len(WORDS)] for i in range(30))
    texts = [(long_text, " yes good cat", " no bad dog"),
             ("question:", " " + long_text, " no"),
             ("question: red green blue answer:", " yes good five six", " no bad")]
    pairs, stats = tokenize_records(tok, texts, max_length=24, max_prompt_length=23)
    assert stats.prompt_truncated == 1 and stats.completion_truncated >= 2
    assert len(pairs[0].prompt_ids) == 23 and len(pairs[0].chosen_ids) == len(pairs[0].rejected_ids) == 1
    sft = [type(p)(p.prompt_ids, p.chosen_ids, None, p.index) for p in pairs]
    return (collate(pairs, range(3), tok.pad_token_id), collate(sft, range(3), tok.pad_token_id))


@pytest.mark.parametrize("rows", ["pair", "packed"])
@pytest.mark.parametrize("sft", [False, True], ids=["pairs", "sft"])
def test_packed_uneven_truncated_pairs_match_unpadded_rows(model_and_batch, uneven_batches, rows, sft):
    model, tok, _ = model_and_batch
    batch = uneven_batches[sft]
    ref, ref_grads = _values_and_grads(model, batch, PLAIN)
    packed = ForwardPlan("packed", chunk_size=3, rows=rows, attention="sdpa")
    _assert_same(*_values_and_grads(model, batch, packed), ref, ref_grads)
    with torch.no_grad():  # and against the independent one-sequence-at-a-time reference
        out = forward_logps(model, batch, packed)
    for i in range(3):
        p = batch.prompt_ids[i][batch.prompt_mask[i].bool()].tolist()
        c = batch.chosen_ids[i][batch.chosen_mask[i].bool()].tolist()
        torch.testing.assert_close(out.chosen_logps[i], _manual_logps(model, tok, p, c), atol=1e-4, rtol=0)


def test_packed_composes_with_activation_checkpointing(tiny_model_dir, model_and_batch):
    """Under checkpointing the plan drops the KV cache (a replayed layer would extend it twice): `cache` becomes
    one row per answer, but packed keeps running packed, with the plain path's values and gradients."""
    from preftune.device import ForwardOptions, plan_forward

    _, _, batch = model_and_batch
    model, _ = load_model_and_tokenizer(str(tiny_model_dir))
    ref, ref_grads = _values_and_grads(model, batch, PLAIN)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    for asked, path in (("packed", "packed"), ("auto", "packed"), ("cache", "off")):
        plan = plan_forward(model, options=ForwardOptions(asked, 4), checkpointing=True)
        assert plan.path == path and "activation checkpointing on" in plan.description
    _assert_same(*_values_and_grads(model, batch, ForwardPlan("packed", chunk_size=4, attention="sdpa")), ref,
                 ref_grads)


def _fake_lm(**config):
    return types.SimpleNamespace(config=types.SimpleNamespace(**config))


@pytest.mark.parametrize("config, reason", [
    (dict(_attn_implementation="flash_attention_2"), "takes no custom mask"),
    (dict(_attn_implementation="sdpa", sliding_window=4096), "sliding-window"),
    (dict(_attn_implementation="sdpa", sliding_window=4096, use_sliding_window=False,
          layer_types=["full_attention", "sliding_attention"]), "sliding-window or chunked"),
])
def test_backends_without_custom_masks_are_not_packed(config, reason):
    assert reason in logprobs.packed_unsupported(_fake_lm(**config))
    # Qwen2-style: a sliding window configured but switched off is fine.
    assert logprobs.packed_unsupported(_fake_lm(_attn_implementation="sdpa", sliding_window=4096,
                                                use_sliding_window=False)) is None


def test_unknown_path_is_refused():
    with pytest.raises(ValueError, match="a forward path is one of packed, cache, off"):
        ForwardPlan("fast")
    with pytest.raises(ValueError, match="rows must be"):
        ForwardPlan("packed", rows="one")


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_block_mask_through_the_model(tiny_model_dir, model_and_batch, monkeypatch):
    """transformers' flex_attention backend with our BlockMask (whole batch in one row), forward only:
    FlexAttention has no CPU backward, and its compiled kernel takes ~25 s to build on this CPU, so the
    eager FlexAttention implementation stands in for the compiled one (same mask semantics)."""
    fa = pytest.importorskip("transformers.integrations.flex_attention")
    from torch.nn.attention.flex_attention import flex_attention

    monkeypatch.setattr(fa, "compile_friendly_flex_attention",
                        lambda q, k, v, training=False, **kw: flex_attention(q, k, v, **kw))
    model, _, batch = model_and_batch
    flex_model, _ = load_model_and_tokenizer(str(tiny_model_dir), attn_implementation="flex_attention")
    with torch.no_grad():
        ref = forward_logps(model, batch, PLAIN)
        out = forward_logps(flex_model, batch, ForwardPlan("packed", 1024, rows="packed", attention="flex_attention"))
    torch.testing.assert_close(out.chosen_logps, ref.chosen_logps, atol=1e-4, rtol=0)
    torch.testing.assert_close(out.rejected_logps, ref.rejected_logps, atol=1e-4, rtol=0)


@pytest.mark.parametrize("mode", ["packed", "cache", "off"])
def test_sft_batch_has_no_rejected(model_and_batch, mode):
    model, tok, _ = model_and_batch
    pairs, _ = tokenize_records(tok, [("question: red answer:", " yes good cat")], max_length=64, max_prompt_length=32)
    batch = collate(pairs, [0], tok.pad_token_id)
    out = forward_logps(model, batch, ForwardPlan(mode, 1024, attention="sdpa"))
    assert out.rejected_logps is None
    p, c = pairs[0].prompt_ids, pairs[0].chosen_ids
    torch.testing.assert_close(out.chosen_logps[0], _manual_logps(model, tok, p, c), atol=1e-4, rtol=0)


def test_float64_eager_model_never_runs_the_nan_cache_path_and_stays_float64(tiny_model_dir, model_and_batch):
    """Eager attention adds float64's most negative number to a fully padded (left-padded) prompt row and takes
    its softmax in fp32, where that number is -inf: the row is NaN, and the next layer carries it into real
    tokens through 0·NaN (measured: the pair with the shorter prompt scores NaN on the KV-cache path). The plan's
    probe sees it and takes one row per answer, which equals the one-row forward in float64 (within 1e-9: fp32
    rounding alone would be ~1e-6 here), and the log-probs stay float64."""
    from transformers import AutoModelForCausalLM

    from preftune.device import ForwardOptions, plan_forward
    from preftune.logprobs import LogpsModel, inference

    _, tok, batch = model_and_batch
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64, attn_implementation="eager")
    with torch.no_grad():
        assert forward_logps(model, batch, ForwardPlan("cache")).chosen_logps.isnan().any()  # the path itself
    logprobs._said.clear()
    plan = plan_forward(model, options=ForwardOptions("cache"), training=False)
    assert plan.path == "off"
    assert plan_forward(model, options=ForwardOptions("auto"), training=False).path == "packed"  # fine there
    handle = LogpsModel(model, plan)
    with inference(handle):
        out = handle(batch)
    assert out.chosen_logps.dtype == torch.float64
    for i in range(len(batch)):
        p = batch.prompt_ids[i][batch.prompt_mask[i].bool()].tolist()
        c = batch.chosen_ids[i][batch.chosen_mask[i].bool()].tolist()
        with torch.no_grad():
            ids = torch.tensor([p + c])
            lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
        torch.testing.assert_close(out.chosen_logps[i], lp[len(p) - 1:].sum(), atol=1e-9, rtol=0)
