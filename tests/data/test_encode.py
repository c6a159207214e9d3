"""Batched tokenization (preftune.data.encode) gives exactly the per-pair rule's ids (preftune.data.tokenize:
`_Encoder.texts` + `truncate_pair`, one pair at a time, as training tokenized before batching): on hand-made
boundary cases and on random text, for tokenizers with and without prefix reuse."""

from __future__ import annotations

import copy

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

import preftune.data.encode as encode
from preftune.data.encode import BatchEncoder, prefix_reuse, tokenize_records
from preftune.data.tokenize import TokenizedPair, TokenizeStats, _Encoder, truncate_pair

# Llama-3's pre-tokenizer regex (tokenizer.json of meta-llama/Meta-Llama-3-8B)
LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
          r"\s+(?!\S)|\s+")
CORPUS = ["question: red cat answer: yes good dog", "no bad bird, it's 1234 then 56.", "héllo wörld 日本語 ok",
          "the sky is blue\n\nHuman: hi\n\nAssistant: hello there", "emoji 😀 and tabs\tand   spaces"] * 20


def _bpe(pre_tokenizer, *, normalizer=None, bos_template: bool = False, eos_template: bool = False):
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizer
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    if bos_template or eos_template:
        single = ("<s> " if bos_template else "") + "$A" + (" </s>" if eos_template else "")
        tok.post_processor = processors.TemplateProcessing(
            single=single, special_tokens=[("<s>", tok.token_to_id("<s>")), ("</s>", tok.token_to_id("</s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


def _wordpiece():
    """BERT-style pieces (whitespace and punctuation split, digits one by one) and WordPiece, no normalizer."""
    tok = Tokenizer(models.WordPiece(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.BertPreTokenizer(),
                                                 pre_tokenizers.Digits(individual_digits=True)])
    tok.train_from_iterator(CORPUS, trainers.WordPieceTrainer(vocab_size=300, show_progress=False,
                                                               special_tokens=["<unk>", "<s>", "</s>", "<pad>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


class _Wrapped(PreTrainedTokenizerFast):
    """A tokenizer class that changes how text is encoded: the batch path must call it one text at a time."""

    def _encode_plus(self, *a, **k):
        return super()._encode_plus(*a, **k)


TOKENIZERS = {
    "gpt2-bytelevel": lambda: _bpe(pre_tokenizers.ByteLevel(add_prefix_space=False)),
    "llama3-split": lambda: _bpe(pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]), bos_template=True),
    "bos-and-eos-template": lambda: _bpe(pre_tokenizers.ByteLevel(add_prefix_space=False), bos_template=True,
                                         eos_template=True),
    "whitespace-split": lambda: _bpe(pre_tokenizers.WhitespaceSplit()),
    "bert-wordpiece": lambda: _wordpiece(),
    "no-bos-token": lambda: PreTrainedTokenizerFast(
        tokenizer_object=_bpe(pre_tokenizers.ByteLevel(add_prefix_space=False)).backend_tokenizer, eos_token="</s>"),
    "nfkc-normalizer": lambda: _bpe(pre_tokenizers.ByteLevel(add_prefix_space=False), normalizer=normalizers.NFKC()),
    "no-pre-tokenizer": lambda: _bpe(None),
}
REUSES = {"gpt2-bytelevel", "llama3-split", "bos-and-eos-template", "whitespace-split", "bert-wordpiece",
          "no-bos-token"}


@pytest.fixture(scope="module", params=sorted(TOKENIZERS))
def tok(request):
    return request.param, TOKENIZERS[request.param]()


def per_pair(tokenizer, texts, max_length, max_prompt_length):
    """The rule one pair at a time (the loop tokenize_records ran before it was batched)."""
    encoder, stats, out = _Encoder(tokenizer), TokenizeStats(), []
    for index, (prompt, *answers) in enumerate(texts):
        prompt_ids, answer_ids, had_eos = encoder.texts(prompt, answers)
        if any(not a for a in answer_ids):
            stats.dropped_empty.append(index)
            continue
        pair = TokenizedPair(prompt_ids, answer_ids[0], answer_ids[1] if len(answer_ids) > 1 else None, index)
        pair = truncate_pair(pair, max_length=max_length, max_prompt_length=max_prompt_length,
                             bos_id=tokenizer.bos_token_id, stats=stats, unk_id=tokenizer.unk_token_id)
        if pair is not None:
            stats.eos_in_text += sum(had_eos)
            out.append(pair)
    stats.kept = len(out)
    return out, stats


def assert_same(tokenizer, texts, max_length=64, max_prompt_length=32):
    want = per_pair(tokenizer, texts, max_length, max_prompt_length)
    for reuse in (True, False):
        got = tokenize_records(tokenizer, texts, max_length=max_length, max_prompt_length=max_prompt_length,
                               chunk=7, reuse=reuse)
        assert got == want, (reuse, texts)


BOUNDARY = [
    ("question: red ans", "wer: yes", "wer: no"),           # BPE merges across the boundary
    ("it'", "s red", "s blue"),                             # a contraction split by the boundary
    ("count 12", "34 cats", "35 cats"),                     # digits continuing across it
    ("the sky is   ", "blue", " green"),                    # a whitespace run before the answer
    ("hello <", "/s> there", "s> here"),                    # a special token's text cut by the boundary
    ("<s>question: red answer:", " yes", " no"),            # prompt already starts with BOS
    ("question: red answer:", " yes</s>", " no</s>\n"),     # answers ending in EOS (+ a newline after it)
    ("question: red answer:", "", " no"),                   # empty answer: dropped
    ("question: red answer:", " same", " same"),            # identical answers: dropped
    ("question: héllo wörld", "ö yes", "é no"),             # multi-byte characters at the boundary
    ("emoji test \U0001f600", "\U0001f601 yes", "\U0001f600 no"),
    ("e", "\u0301 combining", " plain"),                    # a combining accent right after the prompt
    ("", " answer only", " other"),                         # empty prompt
    ("x " * 40, "long prompt cut on the left", "short"),    # prompt truncation (keeps BOS where there is one)
    ("q", " " + "word " * 30, " " + "word " * 29 + "bird"),  # answers identical once cut on the right
]


def test_boundary_cases(tok):
    name, tokenizer = tok
    assert_same(tokenizer, BOUNDARY)
    assert_same(tokenizer, BOUNDARY, max_length=12, max_prompt_length=5)
    assert_same(tokenizer, BOUNDARY, max_length=3, max_prompt_length=1)
    assert_same(tokenizer, [t[:2] for t in BOUNDARY], max_length=12, max_prompt_length=5)  # SFT (one answer)
    assert (BatchEncoder(tokenizer, max_length=64, max_prompt_length=32).reuse is not None) == (name in REUSES)


ALPHABET = st.sampled_from(list("abcdé日 😀\u0301'1234.,!?:") + [" ", "  ", "\n", "\t", "\n\n", "<s>", "</s>",
                                                                  "Human:", "Assistant:", "it's", "question"])
TEXT = st.lists(ALPHABET, max_size=40).map("".join)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_random_text(tok, data):
    """Random prompts and answers over an alphabet of the characters that make boundaries hard (spaces, newlines,
    digits, apostrophes, multi-byte and combining characters, special tokens' text), several at once so the
    batch mixes fast-path and plain pairs; limits from generous to tight."""
    _, tokenizer = tok
    texts = data.draw(st.lists(st.tuples(TEXT, TEXT, TEXT), min_size=1, max_size=12))
    max_length = data.draw(st.sampled_from([512, 24, 6]))
    assert_same(tokenizer, texts, max_length=max_length, max_prompt_length=max(1, max_length // 3))


def test_prefix_reuse_covers_most_pairs_of_long_prompts():
    """With prompts of many pieces, every pair takes the fast path (head > 0: most prompt tokens are not
    encoded again with each answer)."""
    tokenizer = TOKENIZERS["gpt2-bytelevel"]()
    enc = BatchEncoder(tokenizer, max_length=512, max_prompt_length=256)
    prompts = ["question: red cat answer: yes good dog no bad bird " * 3] * 5
    _, head, _ = enc.reuse.encode(enc, prompts, [[" yes", " no"]] * 5)
    assert all(h > 10 for h in head)


def test_a_failed_self_check_turns_prefix_reuse_off(monkeypatch):
    """If the fast path ever disagreed with the plain encoding on a chunk's first pairs, reuse is switched off
    and the chunk is encoded the plain way: the ids stay right."""
    tokenizer = TOKENIZERS["gpt2-bytelevel"]()
    real = encode.PrefixReuse.encode

    def broken(self, enc, prompts, answers):
        prompt_ids, head, tails = real(self, enc, prompts, answers)
        return prompt_ids, head, [[t[:-1] for t in tail] for tail in tails]

    monkeypatch.setattr(encode.PrefixReuse, "encode", broken)
    texts = [("question: red cat answer: yes good dog no bad bird", " yes good", " no bad")] * 3
    enc = BatchEncoder(tokenizer, max_length=64, max_prompt_length=32)
    assert enc.reuse is not None
    chunk = enc(texts)
    assert enc.reuse is None
    want, _ = per_pair(tokenizer, texts, 64, 32)
    assert chunk.lengths.tolist() == [[len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)] for p in want]


def test_tokenizer_class_that_changes_encoding_is_called_per_text():
    base = TOKENIZERS["gpt2-bytelevel"]()
    wrapped = _Wrapped(tokenizer_object=copy.deepcopy(base.backend_tokenizer), bos_token="<s>", eos_token="</s>",
                       pad_token="<pad>")
    assert encode.rust_backend(wrapped) is None and encode.rust_backend(base) is not None
    assert_same(wrapped, BOUNDARY)


@pytest.mark.parametrize("pattern, looks_back", [
    (LLAMA3, False), (r"[^\s]+", False), (r"\w+|[^\w\s]+", False), (r"^\s+", True), (r"\bfoo", True),
    (r"(?<=a)b", True), (r"[\^a]+", False), (r"[]^]x", False), (r"a|^b", True)])
def test_regexes_that_look_back_are_refused(pattern, looks_back):
    assert encode._looks_back(pattern) is looks_back


def test_pipelines_that_are_not_local_get_no_prefix_reuse():
    tokenizer = TOKENIZERS["gpt2-bytelevel"]()
    assert prefix_reuse(BatchEncoder(tokenizer, max_length=8, max_prompt_length=4)) is not None
    meta = copy.deepcopy(tokenizer)
    meta.backend_tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    assert prefix_reuse(BatchEncoder(meta, max_length=8, max_prompt_length=4)) is None
    stripping = copy.deepcopy(tokenizer)
    stripping.add_tokens([__import__("tokenizers").AddedToken("<x>", lstrip=True)])
    assert prefix_reuse(BatchEncoder(stripping, max_length=8, max_prompt_length=4)) is None
