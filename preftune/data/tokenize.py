"""Text → token ids for pairs (DPO) and single answers (SFT).

The prompt and each answer are tokenized *jointly* (prompt+answer as one string) and the boundary is the
longest common prefix of the three encodings, so a BPE merge across the prompt/answer boundary never
changes the answer's tokens compared with how the model sees the whole text.

Every answer ends in exactly one EOS, so the model learns to stop: EOS is appended unless the answer already
ends in it. Chat templates of the Llama-2, Mistral and Zephyr kind close the assistant turn with EOS
(``"Blue.</s>\n"``); such an answer gets no second EOS, and the whitespace the template writes *after* that EOS
is cut off: generation stops at EOS, so those tokens are never produced, and training on them would teach the
model to go on after the end of its turn (``... </s>\n</s>``). Plain strings that end in the EOS text follow
the same rule.

Truncation: the prompt loses tokens on the left (its end, next to the answer, matters most), then answers
lose tokens on the right; pairs left with an empty answer, and pairs whose two answers are identical after
truncation (no preference signal left), are dropped and counted, with the cause when the tokenizer itself made
two different texts the same ids (its unknown token, or its normalisation).

This module is the rule for one pair; `preftune.data.encode` runs it over thousands of pairs at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from preftune.errors import PreftuneError

# What tokenization did to a pair: bits of `preftune.data.encode.EncodedChunk.flags`, counted by `TokenizeStats`.
PROMPT_TRUNCATED, ANSWERS_TRUNCATED, DROPPED_EMPTY, DROPPED_IDENTICAL = 1, 2, 4, 8
SAME_IDS = 16  # identical before any truncation: the tokenizer gave two different texts the same ids ...
UNKNOWN = 32  # ... and they hold its unknown token (the characters where the texts differ have no token)


@dataclass
class TokenizedPair:
    """One pair's token ids. `rejected_ids` is None for SFT and unpaired examples. `index` points into the records.
    `label`: an unpaired example's (True: desirable), else None."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int] | None
    index: int
    label: bool | None = None

    @property
    def num_tokens(self) -> int:
        """Unique tokens of the pair: the prompt once, both answers."""
        return len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids or ())

    @property
    def padded_length(self) -> int:
        """Length of the longest prompt+answer row this pair needs (what batching sorts by)."""
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids or ()))


@dataclass
class TokenizeStats:
    kept: int = 0
    dropped_empty: list[int] = field(default_factory=list)
    dropped_identical: list[int] = field(default_factory=list)
    prompt_truncated: int = 0
    completion_truncated: int = 0
    eos_in_text: int = 0  # answers that already ended in EOS (from the chat template or the data)
    # among dropped_identical: identical before any truncation (SAME_IDS), and of those, holding <unk> (UNKNOWN)
    same_ids: list[int] = field(default_factory=list)
    unknown: list[int] = field(default_factory=list)

    def add(self, chunk, start: int) -> None:
        """Count a `preftune.data.encode.EncodedChunk` whose first text is number `start`."""
        self.kept += len(chunk.kept)
        self.dropped_empty += [start + i for i in chunk.where(DROPPED_EMPTY)]
        self.dropped_identical += [start + i for i in chunk.where(DROPPED_IDENTICAL)]
        self.same_ids += [start + i for i in chunk.where(SAME_IDS)]
        self.unknown += [start + i for i in chunk.where(UNKNOWN)]
        self.prompt_truncated += chunk.count(PROMPT_TRUNCATED)
        self.completion_truncated += chunk.count(ANSWERS_TRUNCATED)
        self.eos_in_text += int(chunk.eos.sum())

    def summary(self) -> str:
        parts = [f"{self.kept:,} kept"]
        if self.prompt_truncated:
            parts.append(f"{self.prompt_truncated:,} prompts truncated (left)")
        if self.completion_truncated:
            parts.append(f"{self.completion_truncated:,} answers truncated (right)")
        if self.dropped_empty:
            parts.append(f"{len(self.dropped_empty):,} dropped (empty answer after tokenization)")
        parts += [f"{n:,} dropped ({IDENTICAL_REASONS[cause]})" for cause, n in self.identical_causes().items() if n]
        if self.eos_in_text:
            parts.append(f"{self.eos_in_text:,} answers already end in EOS (no second EOS added)")
        return "tokenized: " + ", ".join(parts)

    def identical_causes(self) -> dict[str, int]:
        """How many identical pairs each cause made: "truncation", "unknown" tokens, or "normalisation"."""
        same = len(self.same_ids)
        return {"truncation": len(self.dropped_identical) - same, "unknown": len(self.unknown),
                "normalisation": same - len(self.unknown)}

    def identical_cause(self, index: int) -> str | None:
        """Why pair `index` was dropped as identical (a key of IDENTICAL_REASONS), None when it was not."""
        if index not in self.dropped_identical:
            return None
        return "unknown" if index in self.unknown else "normalisation" if index in self.same_ids else "truncation"


IDENTICAL_REASONS = {
    "truncation": "chosen and rejected identical after truncation: no signal",
    "unknown": "chosen and rejected become the same tokens: the tokenizer has no token for the characters where "
               "they differ and maps them to its unknown token; use a tokenizer that covers the text",
    "normalisation": "chosen and rejected become the same tokens: the tokenizer's normalisation erases where they "
                     "differ (case, accents or spacing)",
}


def check_tokenizer(tokenizer) -> None:
    """Give a tokenizer without a pad token one, and refuse one that cannot end an answer."""
    if tokenizer.eos_token_id is None:
        raise PreftuneError(
            f"the tokenizer of {getattr(tokenizer, 'name_or_path', 'this model')!r} has no EOS token; "
            "set tokenizer.eos_token (and save it) so answers can end."
        )
    if tokenizer.pad_token_id is None:
        # Padding positions are masked out everywhere, so any id works; EOS is the usual choice.
        tokenizer.pad_token = tokenizer.eos_token


def answer_text(answer: str, eos_token: str | None) -> str:
    """The answer as it is trained: cut right after a final EOS (whitespace a template writes after it is
    never generated, so it is not part of the answer); any other answer unchanged."""
    end = answer.rstrip()
    return end if eos_token and end.endswith(eos_token) else answer


class _Encoder:
    """One tokenizer's encoding rules, worked out once per call of `tokenize_records`."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.bos, self.eos_text, self.eos = tokenizer.bos_token, tokenizer.eos_token, tokenizer.eos_token_id
        # Some tokenizers append EOS as a special token; answers get their EOS from `texts` instead.
        with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
        plain = tokenizer("a", add_special_tokens=False)["input_ids"]
        self.appends_eos = len(with_special) > len(plain) and with_special[-1] == self.eos

    def encode(self, text: str) -> list[int]:
        # A chat template usually renders the BOS token itself; adding special tokens again would double it.
        add_special = not (self.bos and text.startswith(self.bos))
        ids = list(self.tokenizer(text, add_special_tokens=add_special)["input_ids"])
        if add_special and self.appends_eos and ids and ids[-1] == self.eos:
            ids.pop()
        return ids

    def texts(self, prompt: str, answers: Sequence[str]) -> tuple[list[int], list[list[int]], list[bool]]:
        """(prompt_ids, answer_ids, whether each answer already ended in EOS)."""
        answers = [answer_text(a, self.eos_text) for a in answers]
        prompt_ids = self.encode(prompt)
        full = [self.encode(prompt + a) for a in answers]
        cut = _common_prefix(prompt_ids, *full)
        out, had_eos = [], []
        for f in full:
            ids = f[cut:]
            had_eos.append(bool(ids) and ids[-1] == self.eos)
            out.append(ids if not ids or had_eos[-1] else ids + [self.eos])
        return full[0][:cut], out, had_eos


def _common_prefix(*seqs: Sequence[int]) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        first = seqs[0][i]
        if any(s[i] != first for s in seqs[1:]):
            return i
    return n


def _truncate_prompt(prompt: list[int], max_prompt_length: int, bos_id: int | None) -> list[int]:
    if len(prompt) <= max_prompt_length:
        return prompt
    # Keep a leading BOS: models are trained to see it first, and it is one token.
    if bos_id is not None and prompt and prompt[0] == bos_id and max_prompt_length > 1:
        return [bos_id] + prompt[len(prompt) - max_prompt_length + 1:]
    return prompt[len(prompt) - max_prompt_length:]


def tokenize_texts(tokenizer, prompt: str, answers: Sequence[str]) -> tuple[list[int], list[list[int]]]:
    """Joint tokenization of one prompt with one or more answers, each ending in exactly one EOS.

    Returns (prompt_ids, [answer_ids, ...]) where prompt_ids + answer_ids is exactly the encoding of
    prompt + `answer_text(answer)`, plus EOS unless that already ends in EOS. An answer that adds no token
    of its own gives [].
    """
    prompt_ids, answer_ids, _ = _Encoder(tokenizer).texts(prompt, answers)
    return prompt_ids, answer_ids


def truncate_pair(pair: TokenizedPair, *, max_length: int, max_prompt_length: int, bos_id: int | None,
                  stats: TokenizeStats, unk_id: int | None = None) -> TokenizedPair | None:
    """`pair` cut to the limits (prompt from the left, keeping a leading BOS, then answers from the right),
    counted in `stats`; None when its two answers are identical afterwards (no preference signal left), with the
    cause when they were identical before any cut (holding `unk_id` or not)."""
    if pair.rejected_ids is not None and pair.chosen_ids == pair.rejected_ids:
        stats.same_ids.append(pair.index)
        if unk_id is not None and unk_id in pair.chosen_ids:
            stats.unknown.append(pair.index)
    prompt = _truncate_prompt(pair.prompt_ids, max_prompt_length, bos_id)
    stats.prompt_truncated += len(prompt) < len(pair.prompt_ids)
    answers = [pair.chosen_ids] if pair.rejected_ids is None else [pair.chosen_ids, pair.rejected_ids]
    room = max_length - len(prompt)
    if any(len(a) > room for a in answers):
        stats.completion_truncated += 1
        answers = [a[:room] for a in answers]
    if len(answers) > 1 and answers[0] == answers[1]:
        stats.dropped_identical.append(pair.index)
        return None
    return TokenizedPair(prompt, answers[0], answers[1] if len(answers) > 1 else None, pair.index)
