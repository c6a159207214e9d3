"""Row checks: each raw row becomes its normalised records, pairs dropped as untrainable, or the one reason it is
invalid.

Record shapes (``kind="preference"``):

* standard: ``{"prompt": str, "chosen": str, "rejected": str}`` (chosen/rejected are completions only);
* conversational: ``{"prompt": list[msg], "chosen": list[msg], "rejected": list[msg]}`` (+ ``"tools"`` when the
  row has a tools column), msg = ``{"role", "content"}`` with string content (`preftune.data.messages`);
* implicit (no prompt field): the shared beginning of chosen and rejected becomes the prompt
  (`preftune.data.implicit`), giving one of the two shapes above.

``kind="sft"`` gives ``{"prompt": ..., "completion": ...}`` from prompt/completion data, or from preference
data by taking chosen as the completion (the DPO paper's "Preferred-FT" baseline, Rafailov et al., 2023, §6).

A row that is well formed but holds nothing to train on is not invalid: an empty or whitespace-only answer, two
identical answers or a tie is a `Skip`, dropped and counted (HH-RLHF's test file has a whitespace-only answer;
it should cost that pair, not the file). Structural problems (a missing field, a wrong type) make the row
invalid, which stops the run unless --skip-invalid.

When chosen and rejected both repeat the prompt's messages first (UltraFeedback-binarized keeps the user turn in
them), the repeat is dropped once; an answer must then begin with the assistant's reply, never with a user or
system turn.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from preftune.data.detect import VOTERS
from preftune.data.fields import MISSING, Problem, Skip
from preftune.data.implicit import USER_ROLES, split_message_prompt, split_text_prompt
from preftune.data.layouts import RANKED_FROM, Layout
from preftune.data.messages import Reason, messages, tools_of
from preftune.data.rows import MAX_ROW_CHARS, Bad, Rows, type_name

PREFERENCE_FORMATS = ("standard", "conversational", "implicit")
SFT_FORMATS = ("sft", "preference-chosen")


def text(value: Any, name: str, answer: bool = False) -> str | Reason | Skip:
    """A string part, or (reason,) when it is missing, not a string or empty; an empty `answer` is a Skip."""
    if value is MISSING:
        return (f"missing field '{name}'",)
    if isinstance(value, Problem):
        return (value.reason,)
    if not isinstance(value, str):
        return (f"field '{name}' is {type_name(value)}, expected a string",)
    if not value.strip():
        return Skip("empty answer") if answer else (f"field '{name}' is empty",)
    return value


def too_long(*values: Any) -> str | None:
    size = 0
    for v in values:
        if isinstance(v, str):
            size += len(v)
        elif isinstance(v, list):
            size += sum(len(m["content"]) for m in v)
    if size > MAX_ROW_CHARS:
        return f"row longer than {MAX_ROW_CHARS:,} characters ({size:,})"
    return None


def glued(record: dict) -> bool:
    """Whether a string record runs its prompt's last word into an answer's first ("...joke of" + "the
    situation"): the tokenizer then reads one word where two were meant."""
    prompt = record.get("prompt")
    if not isinstance(prompt, str) or not prompt[-1:].isalnum():
        return False
    return any(isinstance(record.get(k), str) and record[k][:1].isalnum() for k in ("chosen", "rejected", "completion"))


def _first_row(layout: Layout, obj: dict) -> dict | None:
    rows = layout.rows(obj)
    return next((r for r in rows if isinstance(r, dict)), None) if isinstance(rows, list) else None


def detect_format(rows: Rows, kind: str, layout: Layout) -> str:
    """The format of one file by a vote of its first rows (ties go to the first format listed)."""
    votes: Counter[str] = Counter()
    for _, raw in rows:
        obj = None if isinstance(raw, Bad) else _first_row(layout, raw)
        if obj is None:
            continue
        if kind == "sft":
            if layout.value(obj, "completion") is not MISSING:
                votes["sft"] += 1
            elif layout.value(obj, "chosen") is not MISSING:
                votes["preference-chosen"] += 1
        else:
            prompt, chosen = layout.value(obj, "prompt"), layout.value(obj, "chosen")
            if prompt is MISSING and not layout.named_prompt:
                votes["implicit"] += 1
            elif isinstance(chosen, (list, dict)) or isinstance(prompt, list):
                votes["conversational"] += 1
            else:
                votes["standard"] += 1
        if sum(votes.values()) >= VOTERS:
            break
    order = SFT_FORMATS if kind == "sft" else PREFERENCE_FORMATS
    if not votes:
        return order[0]
    best = max(votes.values())
    return next(fmt for fmt in order if votes[fmt] == best)


def _same_turns(a: Sequence[dict], b: Sequence[dict]) -> bool:
    # whitespace around a repeated turn is the only difference seen in practice (a stripped prompt column)
    return len(a) == len(b) and all(x["role"] == y["role"] and x["content"].strip() == y["content"].strip()
                                    for x, y in zip(a, b))


def _failed(*parts: Any) -> str | Skip | None:
    """The first reason among checked parts (a structural problem wins over a Skip), else None."""
    reason = next((v[0] for v in parts if isinstance(v, tuple)), None)
    return reason if reason is not None else next((v for v in parts if isinstance(v, Skip)), None)


class RowChecker:
    """row -> its records (and Skips), or the reason (a str) the row is invalid, for one (kind, format, layout).

    ``notes`` counts what was done to valid rows: "prompt_at_turn" / "prompt_at_prefix" (how implicit text
    prompts were split), "repeated_prompt" (answers that repeated the prompt's messages), "ranked_rows" /
    "ranked_pairs" (rows that ranked more than two answers, and the pairs the rule made of them).
    """

    def __init__(self, kind: str, fmt: str, layout: Layout, notes: Counter[str]):
        self.layout, self.notes, self._pending = layout, notes, []
        self.check = {"standard": self._standard, "conversational": self._conversational,
                      "implicit": self._implicit, "sft": self._sft,
                      "preference-chosen": self._preference_chosen}[fmt]

    def __call__(self, obj: dict) -> list[dict | Skip] | str:
        rows = self.layout.rows(obj)
        tools = tools_of(obj)
        for problem in (rows, tools):
            if isinstance(problem, Problem):
                return problem.reason
        out: list[dict | Skip] = []
        for row in rows:  # type: ignore[union-attr]
            if isinstance(row, Skip):
                out.append(row)
                continue
            self._pending = []
            record = self.check(row)
            if isinstance(record, str):
                return record
            if isinstance(record, dict):
                self.notes.update(self._pending)
                if tools and isinstance(record["prompt"], list):
                    record["tools"] = tools
            out.append(record)
        ranked = self.layout.expand is not None and any(isinstance(r, dict) and r.get(RANKED_FROM, 2) > 2
                                                        for r in rows)  # type: ignore[union-attr]
        if ranked:
            self.notes["ranked_rows"] += 1
            self.notes["ranked_pairs"] += sum(isinstance(r, dict) for r in out)
        return out

    def _get(self, obj: dict, part: str) -> Any:
        return self.layout.value(obj, part)

    def _name(self, part: str) -> str:
        return self.layout.names[part]

    def _standard(self, obj: dict) -> dict | str | Skip:
        prompt, chosen, rejected = (self._get(obj, k) for k in ("prompt", "chosen", "rejected"))
        # a message-list row in string data: name the real problem instead of "is list, expected a string"
        if isinstance(prompt, list) or isinstance(chosen, (list, dict)):
            return "row is conversational (message lists) but the data is standard (strings); mixed formats"
        return self._pair(text(prompt, self._name("prompt")), text(chosen, self._name("chosen"), True),
                          text(rejected, self._name("rejected"), True))

    def _conversational(self, obj: dict) -> dict | str | Skip:
        prompt, chosen, rejected = (self._get(obj, k) for k in ("prompt", "chosen", "rejected"))
        if isinstance(prompt, str) and isinstance(chosen, str):
            return "row is standard (strings) but the data is conversational (message lists); mixed formats"
        p = messages(prompt, self._name("prompt"), allow_string="user")
        c = messages(chosen, self._name("chosen"), allow_string="assistant", answer=True)
        r = messages(rejected, self._name("rejected"), allow_string="assistant", answer=True)
        failed = _failed(p, c, r)
        if failed is not None:
            return failed
        answers = self._after_prompt(p, [c, r], ("chosen", "rejected"))
        return answers if isinstance(answers, (str, Skip)) else self._pair(p, *answers)

    def _pair(self, p: Any, c: Any, r: Any) -> dict | str | Skip:
        failed = _failed(p, c, r)
        if failed is not None:
            return failed
        if c == r:
            return Skip("identical answers")
        return too_long(p, c, r) or {"prompt": p, "chosen": c, "rejected": r}

    def _after_prompt(self, prompt: list[dict], answers: list[list[dict]], sides: Sequence[str]) -> list | str | Skip:
        """The answers without a repeat of the prompt's messages; each must begin with the assistant's turn."""
        n = len(prompt)
        repeats = [_same_turns(a[:n], prompt) for a in answers]
        if all(repeats):
            answers = [a[n:] for a in answers]
            self._pending.append("repeated_prompt")
        elif any(repeats):
            which = sides[repeats.index(True)]
            return (f"{which} repeats the prompt's messages but the other answer does not; give both the "
                    "reply only, or both the whole conversation")
        for side, answer in zip(sides, answers):
            if not answer:
                return Skip("empty answer")
            if answer[0]["role"] in USER_ROLES:
                return (f"{side} begins with a {answer[0]['role']} message that is not the prompt's; an answer "
                        "holds the assistant's reply (or repeats the whole prompt before it)")
        return answers

    def _implicit_parts(self, obj: dict) -> tuple | str | Skip:
        """(prompt, chosen, rejected) split off the shared beginning of chosen and rejected."""
        chosen = self._get(obj, "chosen")
        if isinstance(chosen, (list, dict)):
            c = messages(chosen, self._name("chosen"))
            r = messages(self._get(obj, "rejected"), self._name("rejected"))
        else:
            c = text(chosen, self._name("chosen"), True)
            r = text(self._get(obj, "rejected"), self._name("rejected"), True)
        failed = _failed(c, r)
        if failed is not None:
            return failed
        if c == r:
            return Skip("identical answers")
        if isinstance(c, list):
            k = split_message_prompt(c, r)
        else:
            split = split_text_prompt(c, r)
            if isinstance(split, str):
                return split
            k, how = split
            self._pending.append(f"prompt_at_{how}")
        if isinstance(k, str):
            return k
        p, c, r = c[:k], c[k:], r[k:]
        for answer in (c, r):
            empty = not answer if isinstance(answer, list) else not answer.strip()
            if empty or (isinstance(answer, list) and not any(m["content"].strip() or m.get("tool_calls")
                                                              for m in answer)):
                return Skip("empty answer")
        return p, c, r

    def _implicit(self, obj: dict) -> dict | str | Skip:
        out = self._implicit_parts(obj)
        if isinstance(out, (str, Skip)):
            return out
        p, c, r = out
        return too_long(p, c, r) or {"prompt": p, "chosen": c, "rejected": r}

    def _sft(self, obj: dict, part: str = "completion") -> dict | str | Skip:
        prompt, completion = self._get(obj, "prompt"), self._get(obj, part)
        if isinstance(prompt, list) or isinstance(completion, (list, dict)):
            p = messages(prompt, self._name("prompt"), allow_string="user")
            c = messages(completion, self._name(part), allow_string="assistant", answer=True)
            if _failed(p, c) is None:
                answers = self._after_prompt(p, [c], (part,))
                if isinstance(answers, (str, Skip)):
                    return answers
                c = answers[0]
        else:
            p, c = text(prompt, self._name("prompt")), text(completion, self._name(part), True)
        failed = _failed(p, c)
        if failed is not None:
            return failed
        return too_long(p, c) or {"prompt": p, "completion": c}

    def _preference_chosen(self, obj: dict) -> dict | str | Skip:
        no_prompt = self._get(obj, "prompt") is MISSING and not self.layout.named_prompt
        if no_prompt and self._get(obj, "rejected") is not MISSING:
            out = self._implicit_parts(obj)  # implicit-prompt preference data: the shared beginning is the prompt
            if isinstance(out, (str, Skip)):
                return out
            return too_long(out[0], out[1]) or {"prompt": out[0], "completion": out[1]}
        return self._sft(obj, "chosen")
