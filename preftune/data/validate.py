"""Row checks: each raw row becomes a normalised record or the one reason it is invalid.

Record shapes (``kind="preference"``):

* standard: ``{"prompt": str, "chosen": str, "rejected": str}`` (chosen/rejected are completions only);
* conversational: ``{"prompt": list[msg], "chosen": list[msg], "rejected": list[msg]}``,
  msg = ``{"role", "content"}`` with string content;
* implicit (no prompt field): the shared beginning of chosen and rejected becomes the prompt
  (`preftune.data.implicit`), giving one of the two shapes above.

``kind="sft"`` gives ``{"prompt": ..., "completion": ...}`` from prompt/completion data, or from preference
data by taking chosen as the completion (the DPO paper's "Preferred-FT" baseline, Rafailov et al., 2023, §6).

Messages are read in three spellings: ``{"role", "content"}``; ShareGPT's ``{"from", "value"}`` (speakers
human/gpt/system); and content given as a list of parts, ``[{"type": "text", "text": ...}]`` (OpenAI), whose
text parts are joined with a newline as vLLM does for text-only models. A chosen/rejected given as one message
object counts as a one-message list. When chosen and rejected both repeat the prompt's messages first
(UltraFeedback-binarized keeps the user turn in them), the repeat is dropped once; an answer must then begin
with the assistant's reply, never with a user or system turn.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from preftune.data.implicit import USER_ROLES, split_message_prompt, split_text_prompt
from preftune.data.layouts import MISSING, SHAREGPT_ROLES, VOTERS, Layout, Problem
from preftune.data.rows import MAX_ROW_CHARS, Bad, Rows, type_name

PREFERENCE_FORMATS = ("standard", "conversational", "implicit")
SFT_FORMATS = ("sft", "preference-chosen")
Reason = tuple[str]  # a failed check: (why,), told apart from a valid str value by its type


def text(value: Any, name: str) -> str | Reason:
    """A string part, or (reason,) when it is missing, not a string or empty."""
    if value is MISSING:
        return (f"missing field '{name}'",)
    if isinstance(value, Problem):
        return (value.reason,)
    if not isinstance(value, str):
        return (f"field '{name}' is {type_name(value)}, expected a string",)
    if not value.strip():
        return (f"field '{name}' is empty",)
    return value


def messages(value: Any, name: str, *, allow_string: str | None = None) -> list[dict] | Reason:
    """A message-list part normalised to [{"role", "content"}], or (reason,).

    `allow_string` is the role a plain string is wrapped into (a string prompt next to message completions).
    """
    if value is MISSING:
        return (f"missing field '{name}'",)
    if isinstance(value, Problem):
        return (value.reason,)
    if isinstance(value, str) and allow_string:
        if not value.strip():
            return (f"field '{name}' is empty",)
        return [{"role": allow_string, "content": value}]
    if isinstance(value, dict):  # ShareGPT's chosen/rejected: one message object
        value = [value]
    if not isinstance(value, list):
        return (f"field '{name}' is {type_name(value)}, expected a list of messages",)
    if not value:
        return (f"field '{name}' is empty",)
    out = []
    for i, msg in enumerate(value, start=1):
        one = _message(msg, f"field '{name}' message {i}")
        if isinstance(one, str):
            return (one,)
        out.append(one)
    return out


def _message(msg: Any, where: str) -> dict | str:
    if not isinstance(msg, dict):
        return f"{where} is {type_name(msg)}, expected an object with role and content"
    if "role" not in msg and "content" not in msg and ("from" in msg or "value" in msg):
        who, content = msg.get("from", MISSING), msg.get("value", MISSING)
        if who is MISSING or content is MISSING:
            return f"{where} has no '{'from' if who is MISSING else 'value'}'"
        role = SHAREGPT_ROLES.get(who) if isinstance(who, str) else None
        if role is None:
            return f"{where} is from {who!r}; ShareGPT speakers are human, gpt and system (tool turns are not read)"
    else:
        role, content = msg.get("role", MISSING), msg.get("content", MISSING)
        if role is MISSING or content is MISSING:
            return f"{where} has no '{'role' if role is MISSING else 'content'}'"
        if not isinstance(role, str) or not role:
            return f"{where} role is {type_name(role)}, expected a string"
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content, start=1):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                what = f"a {kind!r} part" if isinstance(kind, str) else f"part {j} of type {type_name(part)}"
                return f"{where} has {what}; only text parts ({{\"type\": \"text\", \"text\": ...}}) are read"
            parts.append(part["text"])
        content = "\n".join(parts)
    elif not isinstance(content, str):
        return f"{where} content is {type_name(content)}, expected a string or a list of text parts"
    return {"role": role, "content": content}


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


def detect_format(rows: Rows, kind: str, layout: Layout) -> str:
    """The format of one file by a vote of its first rows (ties go to the first format listed)."""
    votes: Counter[str] = Counter()
    for _, obj in rows:
        if isinstance(obj, Bad):
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


class RowChecker:
    """row -> normalised record, or the reason (a str) the row is invalid, for one (kind, format, layout).

    ``notes`` counts what was done to valid rows: "prompt_at_turn" / "prompt_at_prefix" (how implicit text
    prompts were split) and "repeated_prompt" (answers that repeated the prompt's messages).
    """

    def __init__(self, kind: str, fmt: str, layout: Layout, notes: Counter[str]):
        self.layout, self.notes, self._pending = layout, notes, []
        self.check = {"standard": self._standard, "conversational": self._conversational,
                      "implicit": self._implicit, "sft": self._sft,
                      "preference-chosen": self._preference_chosen}[fmt]

    def __call__(self, obj: dict) -> dict | str:
        self._pending = []
        out = self.check(obj)
        if isinstance(out, dict):
            self.notes.update(self._pending)
        return out

    def _get(self, obj: dict, part: str) -> Any:
        return self.layout.value(obj, part)

    def _name(self, part: str) -> str:
        return self.layout.names[part]

    def _standard(self, obj: dict) -> dict | str:
        prompt, chosen, rejected = (self._get(obj, k) for k in ("prompt", "chosen", "rejected"))
        # a message-list row in string data: name the real problem instead of "is list, expected a string"
        if isinstance(prompt, list) or isinstance(chosen, (list, dict)):
            return "row is conversational (message lists) but the data is standard (strings); mixed formats"
        parts = [text(v, self._name(k)) for v, k in ((prompt, "prompt"), (chosen, "chosen"), (rejected, "rejected"))]
        return self._pair(*parts)

    def _conversational(self, obj: dict) -> dict | str:
        prompt, chosen, rejected = (self._get(obj, k) for k in ("prompt", "chosen", "rejected"))
        if isinstance(prompt, str) and isinstance(chosen, str):
            return "row is standard (strings) but the data is conversational (message lists); mixed formats"
        p = messages(prompt, self._name("prompt"), allow_string="user")
        c = messages(chosen, self._name("chosen"), allow_string="assistant")
        r = messages(rejected, self._name("rejected"), allow_string="assistant")
        for v in (p, c, r):
            if isinstance(v, tuple):
                return v[0]
        answers = self._after_prompt(p, [c, r], ("chosen", "rejected"))
        return answers if isinstance(answers, str) else self._pair(p, *answers)

    def _pair(self, p: Any, c: Any, r: Any) -> dict | str:
        for v in (p, c, r):
            if isinstance(v, tuple):
                return v[0]
        if c == r:
            return "chosen is identical to rejected"
        return too_long(p, c, r) or {"prompt": p, "chosen": c, "rejected": r}

    def _after_prompt(self, prompt: list[dict], answers: list[list[dict]], sides: Sequence[str]) -> list | str:
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
                return f"{side} is empty after removing the repeated prompt"
            if answer[0]["role"] in USER_ROLES:
                return (f"{side} begins with a {answer[0]['role']} message that is not the prompt's; an answer "
                        "holds the assistant's reply (or repeats the whole prompt before it)")
        return answers

    def _implicit_parts(self, obj: dict) -> tuple | str:
        """(prompt, chosen, rejected) split off the shared beginning of chosen and rejected."""
        chosen = self._get(obj, "chosen")
        if isinstance(chosen, (list, dict)):
            c = messages(chosen, self._name("chosen"))
            r = messages(self._get(obj, "rejected"), self._name("rejected"))
        else:
            c, r = text(chosen, self._name("chosen")), text(self._get(obj, "rejected"), self._name("rejected"))
        for v in (c, r):
            if isinstance(v, tuple):
                return v[0]
        if c == r:
            return "chosen is identical to rejected"
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
        if not c or (isinstance(c, str) and not c.strip()):
            return "chosen is empty after removing the shared prompt"
        if not r or (isinstance(r, str) and not r.strip()):
            return "rejected is empty after removing the shared prompt"
        return p, c, r

    def _implicit(self, obj: dict) -> dict | str:
        out = self._implicit_parts(obj)
        if isinstance(out, str):
            return out
        p, c, r = out
        return too_long(p, c, r) or {"prompt": p, "chosen": c, "rejected": r}

    def _sft(self, obj: dict, part: str = "completion") -> dict | str:
        prompt, completion = self._get(obj, "prompt"), self._get(obj, part)
        if isinstance(prompt, list) or isinstance(completion, (list, dict)):
            p = messages(prompt, self._name("prompt"), allow_string="user")
            c = messages(completion, self._name(part), allow_string="assistant")
            if not isinstance(p, tuple) and not isinstance(c, tuple):
                answers = self._after_prompt(p, [c], (part,))
                if isinstance(answers, str):
                    return answers
                c = answers[0]
        else:
            p, c = text(prompt, self._name("prompt")), text(completion, self._name(part))
        for v in (p, c):
            if isinstance(v, tuple):
                return v[0]
        return too_long(p, c) or {"prompt": p, "completion": c}

    def _preference_chosen(self, obj: dict) -> dict | str:
        no_prompt = self._get(obj, "prompt") is MISSING and not self.layout.named_prompt
        if no_prompt and self._get(obj, "rejected") is not MISSING:
            out = self._implicit_parts(obj)  # implicit-prompt preference data: the shared beginning is the prompt
            if isinstance(out, str):
                return out
            return too_long(out[0], out[1]) or {"prompt": out[0], "completion": out[1]}
        return self._sft(obj, "chosen")
