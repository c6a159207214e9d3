"""Batched joint tokenization: `preftune.data.tokenize`'s per-pair rule for thousands of pairs at once.

The ids are exactly those of the per-pair rule (`tokenize_texts` + `truncate_pair`; tests compare the two on
hand-made boundary cases and on random text): prompt and answers encoded jointly, the boundary at the longest
common prefix of the encodings of prompt, prompt+chosen and prompt+rejected, one EOS per answer, the prompt
truncated on the left (keeping BOS), then the answers on the right, pairs with an empty answer or identical
answers dropped. What changes is how the work is done:

- A fast ("Rust") tokenizer encodes a whole chunk of texts in one `encode_batch` call, which runs on every
  core; the per-pair rule's bookkeeping (common prefixes, EOS, truncation, dropping) runs on flat numpy arrays.
- Prefix reuse: the per-pair rule encodes the prompt three times (alone, before chosen, before rejected). For
  tokenizers whose pipeline is local (no normalizer; a pre-tokenizer that splits text into pieces the model
  encodes one by one, with no look-behind; see `prefix_reuse`), prompt+answer encodes as the prompt's tokens up
  to a piece boundary a few pieces before its end, followed by the encoding of the rest of the prompt plus the
  answer. Only that short tail is encoded per answer, which halves the work on prompt-heavy data. Pairs whose
  prompt is too short for a safe boundary take the plain path. Each chunk's first pairs are also encoded the
  plain way and compared: a mismatch switches prefix reuse off for the rest of the run.

A tokenizer without a Rust backend is called one text at a time, as the per-pair rule does. `tokenize_records` is
the driver for a list of texts (the audit, scoring, tests); training streams chunks through `BatchEncoder`
(`preftune.data.build`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any

import numpy as np

from preftune.data.tokenize import (
    ANSWERS_TRUNCATED,
    DROPPED_EMPTY,
    DROPPED_IDENTICAL,
    PROMPT_TRUNCATED,
    SAME_IDS,
    UNKNOWN,
    TokenizedPair,
    TokenizeStats,
    answer_text,
    check_tokenizer,
)

PIECE_MARGIN = 3  # pre-tokenizer pieces before the prompt's end that are always re-encoded with the answer
SELF_CHECK = 16  # pairs per chunk whose fast-path ids are compared with the plain path's


@dataclass
class EncodedChunk:
    """The kept pairs of one chunk: ids laid out [prompt | chosen | rejected] per pair in `ids`, `lengths` [n, 1 + k]
    (prompt, each answer), `kept` their positions in the chunk. Per text of the chunk: `flags` (the bits of
    `preftune.data.tokenize`), `eos` (how many of its answers already ended in EOS; 0 for dropped pairs), for
    `preftune.data.tokenize.TokenizeStats`, and `full` [n, 1 + k]: the lengths before truncation (what the audit
    describes)."""

    ids: np.ndarray
    lengths: np.ndarray
    kept: np.ndarray
    flags: np.ndarray
    eos: np.ndarray
    full: np.ndarray

    def count(self, bit: int) -> int:
        return int(np.count_nonzero(self.flags & bit))

    def where(self, bit: int) -> list[int]:
        return np.flatnonzero(self.flags & bit).tolist()


def _flat(lists: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(values, starts, lengths) of ragged int lists."""
    lengths = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
    values = np.fromiter(chain.from_iterable(lists), dtype=np.int64, count=int(lengths.sum()))
    return values, np.cumsum(lengths) - lengths, lengths


def gather(values: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """values[starts[i]:starts[i] + lengths[i]] for every i, concatenated (one vectorised gather)."""
    total = int(lengths.sum())
    if not total:
        return values[:0].copy()
    offsets = np.cumsum(lengths) - lengths
    index = np.arange(total, dtype=np.int64) + np.repeat(starts - offsets, lengths)
    return values[index]


def common_prefix(a: np.ndarray, a_start: np.ndarray, a_len: np.ndarray, b: np.ndarray, b_start: np.ndarray,
                  b_len: np.ndarray) -> np.ndarray:
    """Per segment i: the length of the longest common prefix of a[a_start[i]:][:a_len[i]] and b's segment i."""
    m = np.minimum(a_len, b_len)
    out = m.copy()
    total = int(m.sum())
    if not total:
        return out
    seg = np.repeat(np.arange(len(m)), m)
    pos = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(m) - m, m)
    differ = np.flatnonzero(a[a_start[seg] + pos] != b[b_start[seg] + pos])
    if differ.size:
        first_seg, first = np.unique(seg[differ], return_index=True)
        out[first_seg] = pos[differ[first]]
    return out



def ids_batch(backend: Any, texts: list[str], add_special: bool) -> list[list[int]]:
    """The token ids of each text from one Rust batch call. `encode_batch_fast` (tokenizers >= 0.20) gives the
    same ids without computing character offsets, ~25% less work on short texts; offsets are needed only where
    prefix reuse looks for its restart point."""
    fast = getattr(backend, "encode_batch_fast", None)
    encodings = fast(texts, add_special_tokens=add_special) if fast else backend.encode_batch(
        texts, add_special_tokens=add_special)
    return [e.ids for e in encodings]

class BatchEncoder:
    """The per-pair rule of `preftune.data.tokenize` over chunks of (prompt, answer[, answer]) texts."""

    def __init__(self, tokenizer: Any, *, max_length: int, max_prompt_length: int, reuse: bool = True):
        check_tokenizer(tokenizer)
        self.tokenizer, self.max_length, self.max_prompt_length = tokenizer, max_length, max_prompt_length
        self.bos, self.eos_text = tokenizer.bos_token, tokenizer.eos_token
        self.bos_id, self.eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        self.unk_id = getattr(tokenizer, "unk_token_id", None)
        self.backend = rust_backend(tokenizer)
        with_special = self._encode_raw(["a"], True)[0]
        plain = self._encode_raw(["a"], False)[0]
        self.appends_eos = len(with_special) > len(plain) and with_special[-1] == self.eos
        self.reuse = prefix_reuse(self) if reuse and self.backend is not None else None

    # --- encodings as the per-pair rule defines them
    def _encode_raw(self, texts: list[str], add_special: bool) -> list[list[int]]:
        if self.backend is not None:
            return ids_batch(self.backend, texts, add_special)
        return [list(self.tokenizer(t, add_special_tokens=add_special)["input_ids"]) for t in texts]

    def encode(self, texts: list[str]) -> list[list[int]]:
        """`_Encoder.encode` of each text: special tokens unless the text starts with BOS (a chat template wrote
        it), and a post-processor's own EOS removed."""
        special = [not (self.bos and t.startswith(self.bos)) for t in texts]
        out: list[list[int]] = [[] for _ in texts]
        for flag in (True, False):
            idx = [i for i, s in enumerate(special) if s is flag]
            if not idx:
                continue
            for i, ids in zip(idx, self._encode_raw([texts[i] for i in idx], flag)):
                if flag and self.appends_eos and ids and ids[-1] == self.eos:
                    ids = ids[:-1]
                out[i] = ids
        return out

    # --- one chunk
    def __call__(self, texts: Sequence[tuple[str, ...]]) -> EncodedChunk:
        if not texts:
            return EncodedChunk(np.zeros(0, dtype=np.int64), np.zeros((0, 3), dtype=np.int32), np.zeros(0, np.int64),
                                np.zeros(0, np.uint8), np.zeros(0, np.uint8), np.zeros((0, 3), dtype=np.int64))
        prompts = [t[0] for t in texts]
        answers = [[answer_text(a, self.eos_text) for a in t[1:]] for t in texts]
        k = len(texts[0]) - 1
        if self.reuse is not None:
            prompt_ids, head, tails = self.reuse.encode(self, prompts, answers)
            if self.reuse.checks_left > 0:
                self.reuse.check(self, prompts[:SELF_CHECK], answers[:SELF_CHECK], prompt_ids, head, tails)
                if self.reuse.failed:
                    self.reuse = None
                    return self(texts)
        else:
            prompt_ids = self.encode(prompts)
            head = [0] * len(prompts)
            tails = [self.encode([p + a[j] for p, a in zip(prompts, answers)]) for j in range(k)]
        return self._finish(prompt_ids, np.asarray(head, dtype=np.int64), tails)

    def _finish(self, prompt_ids: list[list[int]], head: np.ndarray, tails: list[list[list[int]]]) -> EncodedChunk:
        """Boundary, EOS, truncation and dropping on flat arrays. Answer j of pair i encodes as
        prompt_ids[i][:head[i]] + tails[j][i] (head 0: the tail is the whole prompt+answer encoding)."""
        p, p_start, p_len = _flat(prompt_ids)
        flats = [_flat(t) for t in tails]
        # the boundary: `head` tokens are shared by construction, then the three-way common prefix, which is the
        # smaller of the prompt's common prefix with each answer
        cut = head + np.min([common_prefix(p, p_start + head, p_len - head, v, s, ln) for v, s, ln in flats], axis=0)
        answers, full_len, had_eos = [], [], []
        for v, s, ln in flats:
            a_start, a_len = s + (cut - head), ln - (cut - head)
            last = v[np.maximum(a_start + a_len - 1, 0)] if v.size else np.full(len(cut), -1)
            eos_in = (a_len > 0) & (last == self.eos)
            full = a_len + ((a_len > 0) & ~eos_in)  # one EOS, appended unless the text ends in it
            answers.append(_with_eos(v, a_start, a_len, full, self.eos))
            full_len.append(full)
            had_eos.append(eos_in)
        empty = np.any([f == 0 for f in full_len], axis=0)
        # the prompt loses tokens on the left, keeping a leading BOS
        mpl = self.max_prompt_length
        over = cut > mpl
        first = p[np.minimum(p_start, max(len(p) - 1, 0))] if p.size else np.full(len(cut), -1)
        keep_bos = over & (cut > 0) & (mpl > 1) & ((first == self.bos_id) if self.bos_id is not None else False)
        body_start = np.where(over, p_start + cut - mpl + keep_bos, p_start)
        body_len = np.where(over, mpl - keep_bos, cut)
        prompt_len = body_len + keep_bos
        # then the answers lose tokens on the right; Python's a[:room] for a room below zero too
        room = self.max_length - prompt_len
        long = np.any([f > room for f in full_len], axis=0)
        kept_len = [np.where(long, np.where(room >= 0, np.minimum(f, room), np.maximum(f + room, 0)), f)
                    for f in full_len]
        identical = same_ids = unknown = np.zeros(len(cut), dtype=bool)
        if len(answers) == 2:
            (a1, s1), (a2, s2) = answers
            same = common_prefix(a1, s1, kept_len[0], a2, s2, kept_len[1])
            identical = ~empty & (kept_len[0] == kept_len[1]) & (same == kept_len[0])
            whole = common_prefix(a1, s1, full_len[0], a2, s2, full_len[1])
            same_ids = ~empty & (full_len[0] == full_len[1]) & (whole == full_len[0])
            unknown = same_ids.copy()
            for i in np.flatnonzero(same_ids):  # rare: look for <unk> in those answers only
                unknown[i] = self.unk_id is not None and bool(np.any(a1[s1[i]:s1[i] + full_len[0][i]] == self.unk_id))
        kept = np.flatnonzero(~empty & ~identical)
        # [BOS? | prompt | answer 1 | answer 2] per kept pair, in one gather from one source array
        bos = self.bos_id if self.bos_id is not None else -1
        source = np.concatenate([p, *(a for a, _ in answers), np.array([bos], dtype=np.int64)])
        segments = [(np.full(len(cut), len(source) - 1), keep_bos.astype(np.int64)), (body_start, body_len)]
        offset = len(p)
        for (a, a_start), ln in zip(answers, kept_len):
            segments.append((a_start + offset, ln))
            offset += len(a)
        starts = np.stack([s[kept] for s, _ in segments], axis=1).reshape(-1)
        lens = np.stack([ln[kept] for _, ln in segments], axis=1).reshape(-1)
        flags = ((over & ~empty) * PROMPT_TRUNCATED + (long & ~empty) * ANSWERS_TRUNCATED + empty * DROPPED_EMPTY
                 + identical * DROPPED_IDENTICAL + same_ids * SAME_IDS + unknown * UNKNOWN).astype(np.uint8)
        return EncodedChunk(
            ids=gather(source, starts, lens),
            lengths=np.stack([prompt_len[kept], *(ln[kept] for ln in kept_len)], axis=1).astype(np.int32),
            kept=kept, flags=flags, eos=(np.sum(had_eos, axis=0) * (~empty & ~identical)).astype(np.uint8),
            full=np.stack([cut, *full_len], axis=1).astype(np.int64))


def _with_eos(values: np.ndarray, start: np.ndarray, length: np.ndarray, full: np.ndarray,
              eos: int) -> tuple[np.ndarray, np.ndarray]:
    """(flat answers, their starts): values[start:start + length], followed by EOS where full > length."""
    out = np.full(int(full.sum()), eos, dtype=np.int64)
    starts = np.cumsum(full) - full
    body = np.ones(len(out), dtype=bool)
    add = np.flatnonzero(full > length)
    body[starts[add] + length[add]] = False
    out[body] = gather(values, start, length)
    return out, starts


def rust_backend(tokenizer: Any) -> Any:
    """The `tokenizers.Tokenizer` behind a fast tokenizer whose encoding transformers does not change, set up as
    transformers sets it for a call (no truncation or padding, its split_special_tokens); else None."""
    # transformers takes a second to import, and `preftune inspect` without a tokenizer never needs it
    from transformers import PreTrainedTokenizerFast

    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        return None
    base = PreTrainedTokenizerFast
    if any(getattr(type(tokenizer), name) is not getattr(base, name) for name in ("__call__", "_encode_plus")):
        return None
    backend = tokenizer.backend_tokenizer
    if backend.truncation is not None:
        backend.no_truncation()
    if backend.padding is not None:
        backend.no_padding()
    split = bool(getattr(tokenizer, "split_special_tokens", False))
    if backend.encode_special_tokens != split:
        backend.encode_special_tokens = split
    return backend


# ---------------------------------------------------------------------------------------------- prefix reuse

_LOCAL_PRETOKENIZERS = {"ByteLevel", "Split", "Whitespace", "WhitespaceSplit", "Digits", "Punctuation",
                        "BertPreTokenizer", "CharDelimiterSplit"}
_MODELS = {"BPE", "WordLevel", "WordPiece", "Unigram"}


def _looks_back(pattern: str) -> bool:
    """Whether a regex can look at text before its match (anchors, word boundaries, look-behind), outside
    character classes: a piece could then depend on what precedes the point where encoding restarts."""
    if re.search(r"\(\?<[=!]|\\[bBAGK]", pattern):
        return True
    in_class, escaped = False, False
    for i, ch in enumerate(pattern):
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif in_class:
            in_class = ch != "]" or pattern[i - 1] == "["
        elif ch == "[":
            in_class = True
        elif ch == "^":
            return True
    return False


def _local_pre_tokenizer(spec: dict | None) -> bool:
    if spec is None:
        return False  # no pre-tokenizer: the model sees the whole text as one piece
    kind = spec.get("type")
    if kind == "Sequence":
        return all(_local_pre_tokenizer(s) for s in spec.get("pretokenizers", ()))
    if kind not in _LOCAL_PRETOKENIZERS or spec.get("add_prefix_space"):
        return False
    if kind == "Split":
        pattern = spec.get("pattern", {})
        return spec.get("behavior") == "Isolated" and not spec.get("invert") and not (
            "Regex" in pattern and _looks_back(pattern["Regex"]))
    return kind != "Punctuation" or spec.get("behavior", "Isolated") == "Isolated"


def _plain_post_processor(spec: dict | None) -> bool:
    if spec is None:
        return True
    kind = spec.get("type")
    if kind == "Sequence":
        return all(_plain_post_processor(s) for s in spec.get("processors", ()))
    if kind == "ByteLevel":
        return not spec.get("trim_offsets")  # offsets locate the restart point
    return kind == "TemplateProcessing"


class PrefixReuse:
    """Encodes prompt+answer as the prompt's tokens up to a piece boundary + the encoding of the rest (module doc).

    Safe for a local pipeline: a piece of the prompt that ends `PIECE_MARGIN` pieces before its end cannot
    change when text is appended (matches of a regex without look-behind depend only on the text from their
    start to a character past their end), and an added token (matched before pre-tokenization) cannot reach
    back across the restart point when that point is more than the longest added token from the prompt's end.
    """

    def __init__(self, backend: Any, prefix: list[int], margin_chars: int):
        self.backend, self.prefix, self.margin_chars = backend, prefix, margin_chars
        self.checks_left, self.failed = 3, False

    def encode(self, enc: BatchEncoder, prompts: list[str], answers: list[list[str]]):
        """(prompt ids, head, tails) for `BatchEncoder._finish`; pairs without a safe restart point get head 0 and
        their whole encodings as tails."""
        bos = enc.bos
        plain = self.backend.encode_batch(prompts, add_special_tokens=False)
        prompt_ids, head, cut_at = [], [], []
        for text, e in zip(prompts, plain):
            special = not (bos and text.startswith(bos))
            ids = e.ids
            prompt_ids.append(self.prefix + ids if special else ids)
            # restart at the first token of the piece PIECE_MARGIN pieces before the last one
            last = e.token_to_word(len(ids) - 1) if ids else None
            span = e.word_to_tokens(last - PIECE_MARGIN) if last is not None and last > PIECE_MARGIN else None
            at, j = -1, span[0] if span else 0
            chars = e.token_to_chars(j) if j > 0 and (not bos or len(text) >= len(bos)) else None
            if chars is not None and 0 < chars[0] < len(text) - self.margin_chars:
                at = chars[0]
            head.append(j + (len(self.prefix) if special else 0) if at >= 0 else 0)
            cut_at.append(at)
        fast = [i for i, at in enumerate(cut_at) if at >= 0]
        slow = [i for i, at in enumerate(cut_at) if at < 0]
        tails: list[list[list[int]]] = []
        for j in range(len(answers[0]) if answers else 0):
            tail: list[list[int]] = [[] for _ in prompts]
            if fast:
                texts = [prompts[i][cut_at[i]:] + answers[i][j] for i in fast]
                for i, ids in zip(fast, ids_batch(self.backend, texts, False)):
                    tail[i] = ids
            if slow:
                for i, ids in zip(slow, enc.encode([prompts[i] + answers[i][j] for i in slow])):
                    tail[i] = ids
            tails.append(tail)
        return prompt_ids, head, tails

    def check(self, enc: BatchEncoder, prompts: list[str], answers: list[list[str]], prompt_ids: list[list[int]],
              head: list[int], tails: list[list[list[int]]]) -> None:
        """Compare the first pairs with the plain encodings; a mismatch turns prefix reuse off (`failed`)."""
        self.checks_left -= 1
        if enc.encode(prompts) != prompt_ids[:len(prompts)]:
            self.failed = True
        for j, tail in enumerate(tails):
            full = enc.encode([p + a[j] for p, a in zip(prompts, answers)])
            if full != [prompt_ids[i][:head[i]] + tail[i] for i in range(len(prompts))]:
                self.failed = True


def prefix_reuse(enc: BatchEncoder) -> PrefixReuse | None:
    """Prefix reuse for this tokenizer, or None when its pipeline is not known to be local."""
    spec = json.loads(enc.backend.to_str())
    model = spec.get("model") or {}
    if spec.get("normalizer") is not None or not _local_pre_tokenizer(spec.get("pre_tokenizer")):
        return None
    if model.get("type") not in _MODELS or model.get("dropout") or not _plain_post_processor(spec.get("post_processor")):
        return None
    added = spec.get("added_tokens") or []
    if any(t.get("lstrip") or t.get("rstrip") or t.get("single_word") for t in added):
        return None
    # special tokens the post-processor adds: a fixed prefix (BOS) and at most the EOS the rule removes again
    for probe in ("a", "hello world"):
        plain = enc._encode_raw([probe], False)[0]
        full = enc._encode_raw([probe], True)[0]
        at = next((i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain), None)
        if at is None or full[at + len(plain):] not in ([], [enc.eos]) or (full[at + len(plain):] and not enc.appends_eos):
            return None
        if probe == "a":
            prefix = full[:at]
        elif full[:at] != prefix:
            return None
    longest = max((len(t.get("content", "")) for t in added), default=0)
    return PrefixReuse(enc.backend, prefix, longest)


def tokenize_records(tokenizer: Any, texts: Sequence[tuple[str, ...]], *, max_length: int, max_prompt_length: int,
                     chunk: int = 4096, reuse: bool = True) -> tuple[list[TokenizedPair], TokenizeStats]:
    """Tokenize rendered texts: (prompt, chosen, rejected) for pairs or (prompt, completion) for SFT.

    The ids are those of `preftune.data.tokenize`'s per-pair rule (`tokenize_texts` + `truncate_pair`); the work
    is batched (`BatchEncoder`; `reuse=False` switches its prefix reuse off). For a few thousand pairs; training
    data goes through `preftune.data.splits`, which keeps the ids in arrays instead.
    """
    encoder = BatchEncoder(tokenizer, max_length=max_length, max_prompt_length=max_prompt_length, reuse=reuse)
    stats = TokenizeStats()
    out: list[TokenizedPair] = []
    for s in range(0, len(texts), chunk):
        enc = encoder(list(texts[s:s + chunk]))
        stats.add(enc, s)
        out += pairs_of(enc, s)
    stats.kept = len(out)
    return out, stats


def pairs_of(enc: EncodedChunk, start: int) -> list[TokenizedPair]:
    """The kept pairs of a chunk whose first text is number `start`, as `TokenizedPair`s."""
    ids = enc.ids.tolist()
    out, at = [], 0
    for local, lengths in zip(enc.kept.tolist(), enc.lengths.tolist()):
        parts = []
        for n in lengths:
            parts.append(ids[at:at + n])
            at += n
        out.append(TokenizedPair(parts[0], parts[1], parts[2] if len(parts) > 2 else None, start + local))
    return out
