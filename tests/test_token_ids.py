"""Tokenization and batch layout against token ids written out by hand.

A word-level tokenizer with a fixed vocabulary makes every id known in advance (the word's position in VOCAB),
so the expected ids below come from neither preftune's tokenize code nor a trained BPE. Ids used:
<unk> 0, <s> 1, </s> 2, <pad> 3, question: 4, answer: 5, red 6, cat 7, yes 8, good 9, no 10, bad 11, dog 12,
tree 13, sun 14, moon 15.
"""

from __future__ import annotations

import torch

from preftune.data.collate import collate
from preftune.data.encode import tokenize_records
from preftune.data.tokenize import TokenizedPair

VOCAB = ["<unk>", "<s>", "</s>", "<pad>", "question:", "answer:", "red", "cat", "yes", "good", "no", "bad", "dog",
         "tree", "sun", "moon"]
BOS, EOS, PAD = 1, 2, 3


def word_tokenizer(template: str | None = None):
    """Whitespace-split words → their VOCAB index; `template` adds special tokens around every encoding."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if template:
        tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=[("<s>", BOS),
                                                                                             ("</s>", EOS)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


def test_pair_ids_and_eos():
    """'question: red cat answer:' → [4, 6, 7, 5]; ' yes good dog' → [8, 9, 12] + EOS; ' no bad' → [10, 11] + EOS."""
    (pair,), stats = tokenize_records(word_tokenizer(), [("question: red cat answer:", " yes good dog", " no bad")],
                                      max_length=64, max_prompt_length=32)
    assert (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids, pair.index) == ([4, 6, 7, 5], [8, 9, 12, 2],
                                                                                 [10, 11, 2], 0)
    assert stats.kept == 1 and stats.prompt_truncated == 0 and stats.completion_truncated == 0
    assert pair.num_tokens == 4 + 4 + 3 and pair.padded_length == 4 + 4


def test_sft_example_has_no_rejected():
    (pair,), _ = tokenize_records(word_tokenizer(), [("answer:", " sun moon")], max_length=64, max_prompt_length=32)
    assert (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids) == ([5], [14, 15, 2], None)


def test_bos_added_once_and_a_trailing_special_eos_not_doubled():
    """A tokenizer that wraps every encoding as <s> … </s>: the prompt starts with one BOS, the tokenizer's own
    trailing EOS is dropped and preftune's EOS ends each answer. A prompt that already starts with '<s>' (a
    rendered chat template) gets no second BOS."""
    tok = word_tokenizer("<s> $A </s>")
    (pair,), _ = tokenize_records(tok, [("question: red answer:", " yes", " no")], max_length=64,
                                  max_prompt_length=32)
    assert (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids) == ([1, 4, 6, 5], [8, 2], [10, 2])
    (pair,), _ = tokenize_records(tok, [("<s> question: answer:", " yes", " no")], max_length=64,
                                  max_prompt_length=32)
    assert (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids) == ([1, 4, 5], [8, 2], [10, 2])


def test_truncation_keeps_prompt_end_and_bos_then_cuts_answers_right():
    """Prompt <s> question: red cat red cat answer: = [1, 4, 6, 7, 6, 7, 5] (7 ids). max_prompt_length 4 keeps BOS
    and the last 3 ids [6, 7, 5]: [1, 6, 7, 5]. max_length 6 leaves 2 answer ids: chosen [8, 9, 12, 2] → [8, 9]
    (EOS lost); rejected [10, 2] fits and is kept whole."""
    tok = word_tokenizer("<s> $A")
    (pair,), stats = tokenize_records(tok, [("question: red cat red cat answer:", " yes good dog", " no")],
                                      max_length=6, max_prompt_length=4)
    assert pair.prompt_ids == [1, 6, 7, 5]
    assert pair.chosen_ids == [8, 9] and pair.rejected_ids == [10, 2]
    assert stats.prompt_truncated == 1 and stats.completion_truncated == 1
    assert stats.summary() == "tokenized: 1 kept, 1 prompts truncated (left), 1 answers truncated (right)"


def test_truncation_without_bos_keeps_the_last_ids():
    (pair,), _ = tokenize_records(word_tokenizer(), [("question: red cat answer:", " yes", " no")], max_length=8,
                                  max_prompt_length=2)
    assert pair.prompt_ids == [7, 5]


def test_empty_answer_is_dropped_with_its_index():
    pairs, stats = tokenize_records(word_tokenizer(), [("answer:", " yes", " no"), ("answer:", "", " no"),
                                                       ("answer:", " dog", " tree")], max_length=8,
                                    max_prompt_length=4)
    assert [(p.index, p.chosen_ids) for p in pairs] == [(0, [8, 2]), (2, [12, 2])]
    assert stats.dropped_empty == [1] and stats.kept == 2
    assert stats.summary() == "tokenized: 2 kept, 1 dropped (empty answer after tokenization)"


def test_collate_layout_by_hand():
    """Prompts left-padded (their ends line up for the shared KV cache), answers right-padded, pad id 3."""
    pairs = [TokenizedPair([4, 6, 5], [8, 2], [10, 11, 2], 7), TokenizedPair([5], [12, 13, 14, 2], [2], 9)]
    b = collate(pairs, [7, 9], PAD)
    t = torch.tensor
    assert torch.equal(b.prompt_ids, t([[4, 6, 5], [3, 3, 5]]))
    assert torch.equal(b.prompt_mask, t([[1, 1, 1], [0, 0, 1]]))
    assert torch.equal(b.chosen_ids, t([[8, 2, 3, 3], [12, 13, 14, 2]]))
    assert torch.equal(b.chosen_mask, t([[1, 1, 0, 0], [1, 1, 1, 1]]))
    assert torch.equal(b.rejected_ids, t([[10, 11, 2], [2, 3, 3]]))
    assert torch.equal(b.rejected_mask, t([[1, 1, 1], [1, 0, 0]]))
    assert torch.equal(b.indices, t([7, 9]))
    assert len(b) == 2 and b.num_tokens == (3 + 1) + (2 + 4) + (3 + 1)


def test_collate_sft_batch_has_no_rejected_side():
    b = collate([TokenizedPair([5], [8, 2], None, 0)], [0], PAD)
    assert b.rejected_ids is None and b.rejected_mask is None and b.num_tokens == 3


def test_batch_to_keeps_every_field():
    b = collate([TokenizedPair([4, 5], [8, 2], [10, 2], 3)], [3], PAD).to("cpu")
    assert b.indices.tolist() == [3] and b.rejected_ids.tolist() == [[10, 2]]


def test_boundary_inside_a_word_moves_into_the_answers():
    """'question: red ca' + 't yes': the prompt alone encodes 'ca' as <unk> (0), the joint text as 'cat' (7), in
    both answers. The prompt keeps only the common prefix [4, 6]; 'cat' starts each answer."""
    (pair,), _ = tokenize_records(word_tokenizer(), [("question: red ca", "t yes", "t no")], max_length=64,
                                  max_prompt_length=32)
    assert (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids) == ([4, 6], [7, 8, 2], [7, 10, 2])


def test_boundary_where_only_one_answer_differs_from_the_prompt():
    """'question: ca' + 't' → [4, 7] but + ' dog' → [4, 0, 12]: the prompt alone is [4, 0]. Only the chosen
    side disagrees at position 1, which is enough to cut there: prompt [4], chosen [7, EOS], rejected
    [0, 12, EOS]."""
    (pair,), _ = tokenize_records(word_tokenizer(), [("question: ca", "t", " dog")], max_length=64,
                                  max_prompt_length=32)
    assert (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids) == ([4], [7, 2], [0, 12, 2])


def test_bos_survives_truncation_to_two():
    """max_prompt_length 2 with a BOS: BOS and the prompt's last id ([1, 5]), not its last two."""
    (pair,), _ = tokenize_records(word_tokenizer("<s> $A"), [("question: red answer:", " yes", " no")],
                                  max_length=8, max_prompt_length=2)
    assert pair.prompt_ids == [1, 5]
