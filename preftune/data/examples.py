"""What the model sees: examples rendered and tokenized exactly as training renders and tokenizes them.

`preftune inspect --show N` prints N of them and writes them under ``examples`` in its JSON report; `train`
prints one in its data summary. With a tokenizer an example holds the rendered prompt and answers (chat
template applied; an answer as `preftune.data.tokenize.answer_text` trains it) and the token pieces where it
matters: the end of the prompt, the start of each answer (the prompt/answer boundary) and the end of each
answer (its EOS). Pieces are vocabulary entries as `convert_ids_to_tokens` gives them: in byte-level BPE ``Ġ``
is a leading space and ``Ċ`` a newline, in SentencePiece ``▁`` is a space.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from preftune.data.encode import tokenize_records
from preftune.data.render import render_sft_texts, render_texts
from preftune.data.tokenize import IDENTICAL_REASONS, TokenizedPair, TokenizeStats, answer_text

EDGE = 8  # token pieces shown at each end
TEXT_LIMIT = 2000  # characters of a text shown in full; longer texts keep their head and tail


def _sides(record: dict) -> tuple[str, ...]:
    return ("chosen", "rejected") if "chosen" in record else ("completion",)


def _plain(value: str | list[dict]) -> str:
    if isinstance(value, str):
        return value
    return "\n".join(f"{m['role']}: {m['content']}" for m in value)


def render_record(tokenizer: Any, record: dict) -> tuple[str, ...]:
    """(prompt, answer, ...) texts as the tokenizer receives them (chat template applied)."""
    return render_texts(tokenizer, record) if "chosen" in record else render_sft_texts(tokenizer, record)


def example(tokenizer: Any, record: dict, texts: Sequence[str], pair: TokenizedPair | None, where: str,
            dropped: str | None = None) -> dict:
    """One example as training sees it: JSON-able, for `format_example` and the audit report.

    `texts` are the rendered (prompt, answer, ...) texts and `pair` their tokenization (None when dropped, with
    `dropped` saying why). Without a tokenizer the record's own texts are shown (messages as "role: content").
    """
    sides = _sides(record)
    if tokenizer is None:
        out = {"where": where, "prompt": _plain(record["prompt"])}
        out.update({s: _plain(record[s]) for s in sides})
        if any(isinstance(record[k], list) for k in ("prompt", *sides)):
            out["note"] = "no tokenizer: messages shown as role: content, chat template not applied"
        return out
    eos = tokenizer.eos_token
    out = {"where": where, "prompt": texts[0]}
    out.update({s: answer_text(t, eos) for s, t in zip(sides, texts[1:])})
    if pair is None:
        out["tokens"] = {"dropped": dropped or "dropped by tokenization"}
        return out
    pieces = tokenizer.convert_ids_to_tokens
    answers = [pair.chosen_ids] if pair.rejected_ids is None else [pair.chosen_ids, pair.rejected_ids]
    tokens: dict[str, Any] = {"prompt": len(pair.prompt_ids), "prompt_end": pieces(pair.prompt_ids[-EDGE:])}
    for side, ids, text in zip(sides, answers, texts[1:]):
        if ids[-1] != tokenizer.eos_token_id:
            how = "cut off by max_length"
        else:
            how = "in the text" if eos and answer_text(text, eos).endswith(eos) else "added"
        tokens[side] = len(ids)
        tokens[f"{side}_eos"] = how
        tokens[f"{side}_start"] = pieces(ids[:EDGE])
        tokens[f"{side}_end"] = pieces(ids[-EDGE:])
    out["tokens"] = tokens
    return out


def examples_from_records(records: Sequence[dict], origins: Sequence[str], n: int, *, tokenizer: Any = None,
                          max_length: int = 1024, max_prompt_length: int = 512) -> list[dict]:
    """The first `n` records as training sees them (tokenized with the same limits when a tokenizer is given)."""
    records = list(records[:n])
    if tokenizer is None:
        return [example(None, r, (), None, w) for r, w in zip(records, origins)]
    texts = [render_record(tokenizer, r) for r in records]
    pairs, stats = tokenize_records(tokenizer, texts, max_length=max_length, max_prompt_length=max_prompt_length)
    by_index = {p.index: p for p in pairs}
    return [example(tokenizer, r, t, by_index.get(i), w, drop_reason(stats, i))
            for i, (r, t, w) in enumerate(zip(records, texts, origins))]


def drop_reason(stats: TokenizeStats, index: int) -> str | None:
    if index in stats.dropped_empty:
        return "an answer adds no token of its own"
    cause = stats.identical_cause(index)
    return IDENTICAL_REASONS[cause] if cause else None


def _show(text: str, limit: int) -> str:
    if len(text) <= limit:
        return repr(text)
    half = limit // 2
    return f"{text[:half]!r} [... {len(text) - 2 * half:,} characters ...] {text[-half:]!r}"


def format_example(ex: dict, title: str, limit: int = TEXT_LIMIT) -> list[str]:
    """Terminal lines for one example: texts as Python string literals (so spaces and newlines show), then
    token counts and the pieces at the prompt/answer boundary and at the end of each answer."""
    sides = [s for s in ("chosen", "rejected", "completion") if s in ex]
    lines = [f"{title} ({ex['where']}):"]
    width = max(len(s) for s in ("prompt", *sides)) + 1
    lines += [f"  {part:<{width}}{_show(ex[part], limit)}" for part in ("prompt", *sides)]
    if "note" in ex:
        lines.append(f"  ({ex['note']})")
    tok = ex.get("tokens")
    if not tok:
        return lines
    if "dropped" in tok:
        lines.append(f"  dropped by tokenization: {tok['dropped']}")
        return lines

    def join(pieces: list[str]) -> str:
        return " ".join(repr(p) for p in pieces)

    counts = ", ".join(f"{s} {tok[s]:,} (EOS {tok[f'{s}_eos']})" for s in sides)
    lines.append(f"  {'tokens':<{width}}prompt {tok['prompt']:,}, {counts}")
    more = "... " if tok["prompt"] > EDGE else ""
    width += 7  # room for " start"
    for s in sides:
        lines.append(f"  {s + ' start':<{width}}{more}{join(tok['prompt_end'])} | {join(tok[f'{s}_start'])}")
    for s in sides:
        lines.append(f"  {s + ' end':<{width}}{'... ' if tok[s] > EDGE else ''}{join(tok[f'{s}_end'])}")
    return lines
