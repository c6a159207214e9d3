"""Text → token ids for pairs (DPO) and single answers (SFT).

The prompt and each answer are tokenized *jointly* (prompt+answer as one string) and the boundary is the
longest common prefix of the three encodings, so a BPE merge across the prompt/answer boundary never
changes the answer's tokens compared with how the model sees the whole text. EOS is appended to every
answer so the model learns to stop. Truncation: the prompt loses tokens on the left (its end, next to the
answer, matters most), then answers lose tokens on the right; pairs left with an empty answer are dropped
and counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from preftune.errors import PreftuneError


@dataclass
class TokenizedPair:
    """One pair's token ids. `rejected_ids` is None for SFT examples. `index` points into the records."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int] | None
    index: int

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
    prompt_truncated: int = 0
    completion_truncated: int = 0

    def summary(self) -> str:
        parts = [f"{self.kept:,} kept"]
        if self.prompt_truncated:
            parts.append(f"{self.prompt_truncated:,} prompts truncated (left)")
        if self.completion_truncated:
            parts.append(f"{self.completion_truncated:,} answers truncated (right)")
        if self.dropped_empty:
            parts.append(f"{len(self.dropped_empty):,} dropped (empty answer after tokenization)")
        return "tokenized: " + ", ".join(parts)


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


def _encode(tokenizer, text: str) -> list[int]:
    # A chat template usually renders the BOS token itself; adding special tokens again would double it.
    bos = tokenizer.bos_token
    add_special = not (bos and text.startswith(bos))
    ids = tokenizer(text, add_special_tokens=add_special)["input_ids"]
    # Some tokenizers append EOS as a special token; we add our own EOS after the answer instead.
    if ids and add_special and ids[-1] == tokenizer.eos_token_id and not text.endswith(tokenizer.eos_token or "\0"):
        ids = ids[:-1]
    return list(ids)


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
    """Joint tokenization of one prompt with one or more answers; EOS appended to each answer.

    Returns (prompt_ids, [answer_ids, ...]) where prompt_ids + answer_ids is exactly the encoding of
    prompt + answer (plus EOS) for every answer.
    """
    prompt_ids = _encode(tokenizer, prompt)
    full = [_encode(tokenizer, prompt + a) for a in answers]
    cut = _common_prefix(prompt_ids, *full)
    eos = tokenizer.eos_token_id
    return full[0][:cut], [f[cut:] + [eos] if len(f) > cut else [] for f in full]


def tokenize_records(tokenizer, texts: Sequence[tuple[str, ...]], *, max_length: int,
                     max_prompt_length: int) -> tuple[list[TokenizedPair], TokenizeStats]:
    """Tokenize rendered texts: (prompt, chosen, rejected) for pairs or (prompt, completion) for SFT."""
    check_tokenizer(tokenizer)
    stats = TokenizeStats()
    out: list[TokenizedPair] = []
    bos_id = tokenizer.bos_token_id
    for index, (prompt, *answers) in enumerate(texts):
        prompt_ids, answer_ids = tokenize_texts(tokenizer, prompt, answers)
        if any(not a for a in answer_ids):  # the answer added no token of its own: nothing to learn from
            stats.dropped_empty.append(index)
            continue
        truncated = _truncate_prompt(prompt_ids, max_prompt_length, bos_id)
        stats.prompt_truncated += len(truncated) < len(prompt_ids)
        room = max_length - len(truncated)
        if any(len(a) > room for a in answer_ids):
            stats.completion_truncated += 1
            answer_ids = [a[:room] for a in answer_ids]
        out.append(TokenizedPair(truncated, answer_ids[0], answer_ids[1] if len(answer_ids) > 1 else None, index))
    stats.kept = len(out)
    return out, stats
