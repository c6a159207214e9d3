"""Joint tokenization, EOS, truncation order and dropping; batch layout and order."""

from __future__ import annotations

import pytest

from preftune.data.collate import collate
from preftune.data.sampler import batch_order
from preftune.data.tokenize import TokenizedPair, tokenize_records
from preftune.errors import PreftuneError
from preftune.modeling.load import load_tokenizer


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_tokenizer(str(tiny_model_dir))


def test_prompt_plus_answer_is_the_joint_encoding(tok):
    prompt, chosen, rejected = "question: red cat answer:", " yes good dog", " no bad dog"
    (pair,), stats = tokenize_records(tok, [(prompt, chosen, rejected)], max_length=100, max_prompt_length=50)
    eos = tok.eos_token_id
    assert pair.prompt_ids + pair.chosen_ids == tok(prompt + chosen)["input_ids"] + [eos]
    assert pair.prompt_ids + pair.rejected_ids == tok(prompt + rejected)["input_ids"] + [eos]
    assert pair.chosen_ids[-1] == eos and stats.kept == 1


def test_boundary_merge_moves_into_the_answers(tok):
    """'answer:' + 'x' vs 'answer:x': when BPE merges across the boundary, the prompt keeps only the common
    prefix, so each answer's ids are still exactly what the model sees in prompt+answer."""
    prompt, chosen, rejected = "question: red ans", "wer: yes", "wer: no"
    (pair,), _ = tokenize_records(tok, [(prompt, chosen, rejected)], max_length=100, max_prompt_length=50)
    assert pair.prompt_ids + pair.chosen_ids[:-1] == tok(prompt + chosen)["input_ids"]
    assert pair.prompt_ids + pair.rejected_ids[:-1] == tok(prompt + rejected)["input_ids"]


def test_truncation_prompt_left_then_answers_right(tok):
    """prompt of 20 word-tokens, answers of ~6: max_prompt_length 8 keeps the prompt's last 8 tokens (its end),
    then max_length 12 leaves 4 tokens for each answer, cut on the right (EOS lost)."""
    prompt = "question: " + " ".join(["red"] * 20) + " answer:"
    chosen, rejected = " yes good cat dog bird tree", " no bad cat dog bird tree"
    full_prompt = tok(prompt)["input_ids"]
    (pair,), stats = tokenize_records(tok, [(prompt, chosen, rejected)], max_length=12, max_prompt_length=8)
    assert pair.prompt_ids == full_prompt[-8:]
    assert len(pair.chosen_ids) == 4 and len(pair.rejected_ids) == 4
    assert pair.chosen_ids[-1] != tok.eos_token_id
    assert stats.prompt_truncated == 1 and stats.completion_truncated == 1


def test_empty_answer_is_dropped_and_counted(tok):
    texts = [("question: red answer:", " yes", " no"), ("question: red answer:", "", " no")]
    pairs, stats = tokenize_records(tok, texts, max_length=64, max_prompt_length=32)
    assert [p.index for p in pairs] == [0]
    assert stats.dropped_empty == [1] and "1 dropped" in stats.summary()


def test_tokenizer_without_pad_token_gets_eos_as_pad(tmp_path):
    from helpers import build_tiny_model

    folder = build_tiny_model(tmp_path / "m", pad_token=False)
    tok = load_tokenizer(str(folder))
    assert tok.pad_token_id == tok.eos_token_id


def test_tokenizer_without_eos_is_refused(tok):
    import copy

    t = copy.deepcopy(tok)
    t.eos_token = None
    with pytest.raises(PreftuneError, match="no EOS token"):
        tokenize_records(t, [("a", "b", "c")], max_length=10, max_prompt_length=5)


def test_collate_layout():
    """Prompts left-padded (all end in the last column), answers right-padded; pad id 0 here."""
    pairs = [TokenizedPair([5, 6, 7], [8, 2], [9, 9, 2], 0), TokenizedPair([5], [8, 8, 8, 2], [2], 1)]
    b = collate(pairs, [3, 4], pad_id=0)
    assert b.prompt_ids.tolist() == [[5, 6, 7], [0, 0, 5]]
    assert b.prompt_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert b.chosen_ids.tolist() == [[8, 2, 0, 0], [8, 8, 8, 2]]
    assert b.rejected_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b.indices.tolist() == [3, 4]
    assert b.num_tokens == 3 + 1 + 2 + 4 + 3 + 1


def test_batch_order_is_deterministic_and_complete():
    lengths = [i % 17 for i in range(100)]
    a = batch_order(lengths, 8, seed=1, epoch=0)
    assert a == batch_order(lengths, 8, seed=1, epoch=0)
    assert a != batch_order(lengths, 8, seed=1, epoch=1)
    assert sorted(i for b in a for i in b) == list(range(100))
    # grouped by length: within a batch the spread is small compared with random batches
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in a)
    plain = batch_order(lengths, 8, seed=1, epoch=0, group_by_length=False)
    assert spread < sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in plain)
