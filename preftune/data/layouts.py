"""Row layouts: where a row keeps its prompt and answers, for the layouts other projects publish.

A `Layout` reads the raw parts of a row (``value(row, "prompt" | "chosen" | "rejected" | "completion")``);
`preftune.data.validate` then checks and normalises them. Detected from the rows' keys when the field names are
left at their defaults (a user who names fields gets exactly those fields):

==============  ==========================================================================================
layout          a row (one line)
==============  ==========================================================================================
fields          ``{"prompt": "2+2=", "chosen": "4", "rejected": "5"}``; message lists work too, and without a
                prompt field the shared beginning of chosen and rejected is the prompt (implicit prompt)
sharegpt        ``{"conversations": [{"from": "human", "value": "2+2="}], "chosen": {"from": "gpt", "value":
                "4"}, "rejected": {"from": "gpt", "value": "5"}}`` (LLaMA-Factory's DPO format; a ``system``
                field becomes a system message)
openai          ``{"input": {"messages": [{"role": "user", "content": "2+2="}]}, "preferred_output":
                [{"role": "assistant", "content": "4"}], "non_preferred_output": [...]}``
alpaca          ``{"instruction": "Add.", "input": "2+2", "output": ["4", "5"], "history": [["hi", "hello"]]}``
                (``output`` = [better, worse], or ``chosen``/``rejected``; ``history`` and ``system`` become
                earlier turns and a system message)
messages        ``{"messages": [...]}`` (SFT only: the last message is the answer)
==============  ==========================================================================================

Field names are paths: ``a.b`` walks into nested objects and ``a.0`` into lists (``input.messages``); a key
that literally contains the dot wins over the walk. A prompt can also be built from several fields with a
`PromptTemplate` (``--prompt-template "{system}\\n\\n{question}"``).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from preftune.data.rows import Bad, Rows, type_name
from preftune.errors import PreftuneError

MISSING: Any = object()
# How many parsed rows vote on the layout and format; enough to outvote a few broken rows at the top of a file.
VOTERS = 1000
DEFAULT_NAMES = {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected", "completion": "completion"}
# ShareGPT speakers -> chat-template roles (LLaMA-Factory's names; "observation"/"function_call" are tool turns,
# which preftune does not train on).
# How the summary names a layout ("fields" goes unnamed: it is the plain prompt/chosen/rejected data).
LAYOUT_LABELS = {"sharegpt": "ShareGPT", "openai": "OpenAI preference", "alpaca": "Alpaca", "messages": "chat messages"}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass(frozen=True)
class Problem:
    """A part of a row that a layout could not build, with the reason (the row is invalid)."""

    reason: str


def get_path(obj: Any, path: str) -> Any:
    """obj[path], else the dotted path walked through nested objects and list indices; MISSING if absent."""
    if isinstance(obj, dict) and path in obj:
        return obj[path]
    if "." not in path:
        return MISSING
    cur: Any = obj
    for part in path.split("."):
        if isinstance(cur, dict) and part in cur:
            cur = cur[part]
        elif isinstance(cur, list) and part.isdigit() and int(part) < len(cur):
            cur = cur[int(part)]
        else:
            return MISSING
    return cur


# ---------------------------------------------------------------------------------------------- templates

_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\"}


@dataclass(frozen=True)
class PromptTemplate:
    """A prompt built from several fields: ``"{system}\\n\\n{question}"``.

    Placeholders are field paths (``{meta.question}``); ``{{`` and ``}}`` are literal braces; ``\\n``, ``\\t``
    and ``\\\\`` are a newline, a tab and a backslash (so the template can be typed on a command line). A field
    that is empty or null is left out together with the text between it and the kept field before it (for
    the first field: the text up to the next field), so ``"### Instruction:\\n{instruction}\\n\\n### Input:\\n
    {input}\\n\\n### Response:\\n"`` gives Alpaca's no-input prompt when ``input`` is empty. A missing field
    makes the row invalid (it is usually a typo in the template).
    """

    source: str
    literals: tuple[str, ...]  # len(names) + 1 pieces of text around the placeholders
    names: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> PromptTemplate:
        if not isinstance(text, str):
            raise PreftuneError(f"prompt_template must be a string like '{{system}}\\n\\n{{question}}', got {text!r}")
        literals: list[str] = []
        names: list[str] = []
        buf: list[str] = []
        decoded = re.sub(r"\\([nt\\])", lambda m: _ESCAPES[m.group(1)], text)
        i = 0
        while i < len(decoded):
            if decoded.startswith(("{{", "}}"), i):
                buf.append(decoded[i])
                i += 2
            elif decoded[i] == "{":
                end = decoded.find("}", i)
                name = decoded[i + 1:end].strip() if end > i else ""
                if not name or "{" in name:
                    raise PreftuneError(f"prompt_template {text!r} has an unclosed or empty {{field}}; "
                                        "write {name} for a field and {{ }} for literal braces")
                literals.append("".join(buf))
                names.append(name)
                buf, i = [], end + 1
            elif decoded[i] == "}":
                raise PreftuneError(f"prompt_template {text!r} has a '}}' without its '{{'; write }}}} for a "
                                    "literal brace")
            else:
                buf.append(decoded[i])
                i += 1
        literals.append("".join(buf))
        if not names:
            raise PreftuneError(f"prompt_template {text!r} names no field; write fields as {{name}}, "
                                "e.g. '{system}\\n\\n{question}'.")
        return cls(text, tuple(literals), tuple(names))

    def fill(self, obj: dict) -> str | Problem:
        """The prompt of one row, or a Problem naming the missing or mistyped field."""
        kept: list[tuple[int, str]] = []
        for i, name in enumerate(self.names):
            value = get_path(obj, name)
            if value is MISSING:
                return Problem(f"missing field '{name}' (used by the prompt template)")
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                return Problem(f"field '{name}' is {type_name(value)}, expected a string (prompt template)")
            if str(value).strip():
                kept.append((i, str(value)))
        if not kept:
            return Problem(f"the prompt template gives an empty prompt (fields {', '.join(self.names)} are empty)")
        out = [self.literals[0]]
        for j, (i, value) in enumerate(kept):
            if j:
                out.append(self.literals[i])  # the text just before this field, usually its label
            out.append(value)
        out.append(self.literals[-1])
        return "".join(out)


# ----------------------------------------------------------------------------------------------- layouts


@dataclass
class Layout:
    """How to read the prompt and answers of one layout; `value` gives MISSING, a Problem or the raw value."""

    name: str  # "fields", "sharegpt", "openai", "alpaca", "messages"
    names: dict[str, str]  # part -> the field named in messages about it
    getters: dict[str, Callable[[dict], Any]] = field(default_factory=dict)
    # a prompt the user named (a field or a template) is never "implicit": a missing one is reported as missing
    named_prompt: bool = False

    def value(self, obj: dict, part: str) -> Any:
        getter = self.getters.get(part)
        return getter(obj) if getter else get_path(obj, self.names[part])


def fields_layout(names: dict[str, str], template: PromptTemplate | None) -> Layout:
    getters = {"prompt": template.fill} if template else {}
    named = template is not None or names["prompt"] != "prompt"
    return Layout("fields", dict(names), getters, named)


def _sharegpt(kind: str, key: str = "conversations") -> Layout:
    """LLaMA-Factory's sharegpt format: the conversation in `key` ("conversations", or "messages" with role/content
    tags), a `system` column, chosen/rejected as one message each."""
    def prompt(obj: dict) -> Any:
        conv = obj.get(key, MISSING)
        if not isinstance(conv, list):
            return conv
        if kind == "sft" and "chosen" not in obj:
            if len(conv) < 2:
                return Problem(f"field '{key}' holds fewer than 2 turns: no prompt before the answer")
            conv = conv[:-1]  # SFT on ShareGPT chat data: the last turn is the answer
        system = obj.get("system")
        if system is not None and not isinstance(system, str):
            return Problem(f"field 'system' is {type_name(system)}, expected a string")
        return ([{"role": "system", "content": system}] if system and system.strip() else []) + conv

    def completion(obj: dict) -> Any:
        if "chosen" in obj:
            return obj["chosen"]
        conv = obj.get(key, MISSING)
        return conv[-1:] if isinstance(conv, list) and conv else conv

    names = {"prompt": key, "chosen": "chosen", "rejected": "rejected", "completion": key}
    return Layout("sharegpt", names, {"prompt": prompt, "completion": completion}, True)


def _openai() -> Layout:
    names = {"prompt": "input.messages", "chosen": "preferred_output", "rejected": "non_preferred_output",
             "completion": "preferred_output"}
    return Layout("openai", names, {}, True)


def _messages_sft() -> Layout:
    def part(last: bool) -> Callable[[dict], Any]:
        def get(obj: dict) -> Any:
            msgs = obj.get("messages", MISSING)
            if not isinstance(msgs, list) or not msgs:
                return msgs
            if len(msgs) < 2:
                return Problem("field 'messages' holds fewer than 2 messages: no prompt before the answer")
            return msgs[-1:] if last else msgs[:-1]
        return get

    names = {"prompt": "messages", "chosen": "messages", "rejected": "messages", "completion": "messages"}
    return Layout("messages", names, {"prompt": part(False), "completion": part(True)}, True)


def _alpaca(template: PromptTemplate | None, chat: bool) -> Layout:
    """Alpaca rows (LLaMA-Factory's alpaca format): the user turn is instruction + "\\n" + input (LLaMA-Factory
    joins them so) or the prompt template; with `chat`, history pairs and the system field come first as
    messages, so earlier turns are kept, not dropped."""
    uses_system = template is not None and "system" in template.names

    def user_turn(obj: dict) -> Any:
        if template is not None:
            return template.fill(obj)
        instruction, extra = obj.get("instruction", MISSING), obj.get("input")
        if not isinstance(instruction, str):
            return instruction if instruction is MISSING else Problem(
                f"field 'instruction' is {type_name(instruction)}, expected a string")
        if extra is not None and not isinstance(extra, str):
            return Problem(f"field 'input' is {type_name(extra)}, expected a string")
        return "\n".join(t for t in (instruction, extra) if t and t.strip())

    def prompt(obj: dict) -> Any:
        user = user_turn(obj)
        if not chat or not isinstance(user, str):
            return user
        msgs: list[dict] = []
        system = obj.get("system")
        if system is not None and not isinstance(system, str):
            return Problem(f"field 'system' is {type_name(system)}, expected a string")
        if system and system.strip() and not uses_system:
            msgs.append({"role": "system", "content": system})
        history = obj.get("history") or []
        if not isinstance(history, list):
            return Problem(f"field 'history' is {type_name(history)}, expected a list of [question, answer]")
        for i, turn in enumerate(history, start=1):
            if not (isinstance(turn, list) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
                return Problem(f"field 'history' item {i} is not a [question, answer] pair of strings")
            msgs += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
        return msgs + [{"role": "user", "content": user}]

    def answer(i: int, name: str) -> Callable[[dict], Any]:
        def get(obj: dict) -> Any:
            out = obj.get("output", MISSING)
            if isinstance(out, list):
                if len(out) != 2:
                    return Problem(f"field 'output' holds {len(out)} answers, expected [chosen, rejected]")
                return out[i]
            return obj.get(name, MISSING)
        return get

    def completion(obj: dict) -> Any:
        out = obj.get("output", MISSING)
        if isinstance(out, list) and out:
            return out[0]
        return out if out is not MISSING else obj.get("chosen", MISSING)

    names = {"prompt": "instruction", "chosen": "output", "rejected": "output", "completion": "output"}
    getters = {"prompt": prompt, "chosen": answer(0, "chosen"), "rejected": answer(1, "rejected"),
               "completion": completion}
    return Layout("alpaca", names, getters, True)


# ------------------------------------------------------------------------------------------------ detection

# Layouts preftune does not read, by the keys that give them away: (label, advice). The advice names the flag or
# format that reads the data, so that the error is one actionable sentence.
_HINTS = {
    "orca": ("Orca-style pairs (system, question, chosen, rejected) with no prompt field",
             "build the prompt with --prompt-template \"{system}\\n\\n{question}\""),
    "question": ("pairs whose prompt is in 'question'", "pass --prompt-field question"),
    "query": ("pairs whose prompt is in 'query'", "pass --prompt-field query"),
    "stack": ("StackExchange-paired data (question, response_j, response_k)",
              "pass --prompt-field question --chosen-field response_j --rejected-field response_k"),
    "pku": ("PKU-SafeRLHF-style data (response_0, response_1 and which is better)",
            "write the better response as 'chosen' and the other as 'rejected' first"),
    "kto": ("unpaired KTO-style data (prompt, completion, label)",
            "preference training needs a chosen and a rejected answer per prompt: pair them up first, or train "
            "on the good completions with `preftune sft`"),
    "sft": ("SFT data (prompt, completion)",
            "train it with `preftune sft`, or give each prompt a chosen and a rejected answer"),
    "chat-sft": ("chat SFT data (messages without chosen/rejected)",
                 "train it with `preftune sft`, or add chosen and rejected replies"),
    "sharegpt-sft": ("ShareGPT SFT data (conversations without chosen/rejected)",
                     "train it with `preftune sft`, or add chosen and rejected message objects as "
                     "LLaMA-Factory's DPO format does"),
    "alpaca-sft": ("Alpaca SFT data (instruction, input and one output)",
                   "train it with `preftune sft`, or give output as [chosen, rejected]"),
    "rated": ("rated completions (UltraFeedback-style 'completions' with ratings)",
              "binarize them into chosen/rejected first, as HuggingFaceH4/ultrafeedback_binarized does"),
    "text": ("plain text (a 'text' field)",
             "preference training needs prompt/chosen/rejected fields, SFT needs prompt/completion"),
}


def _row_layout(obj: dict, kind: str, template: PromptTemplate | None) -> str:
    """The layout one row's keys point to: a layout name, or "hint:<key of _HINTS>"."""
    has = obj.__contains__
    answers = has("chosen") and has("rejected")
    sft_answer = kind == "sft" and (has("completion") or has("chosen"))
    if has("prompt") and (answers or sft_answer):
        return "fields"
    if has("conversations"):
        return "sharegpt" if answers or kind == "sft" else "hint:sharegpt-sft"
    if has("preferred_output") or has("non_preferred_output"):
        return "openai"
    if has("instruction"):
        if isinstance(obj.get("output"), list) or answers or (kind == "sft" and has("output")):
            return "alpaca"
        return "hint:rated" if has("completions") else "hint:alpaca-sft"
    if template is not None and (answers or sft_answer):
        return "fields"
    if answers and isinstance(obj.get("messages"), list):
        return "sharegpt-messages"  # LLaMA-Factory's sharegpt with role/content tags in a "messages" column
    if answers:
        for key, hint in (("question", "orca" if has("system") else "question"), ("query", "query")):
            if has(key):
                return f"hint:{hint}"
        return "fields"  # implicit prompt
    if kind == "sft" and has("messages"):
        return "messages"
    for keys, hint in ((("response_j", "response_k"), "stack"), (("response_0", "response_1"), "pku"),
                       (("prompt", "completion", "label"), "kto"), (("prompt", "completion"), "sft"),
                       (("messages",), "chat-sft"), (("completions",), "rated"), (("text",), "text")):
        if all(map(has, keys)) and not (kind == "sft" and hint in ("sft", "kto")):
            return f"hint:{hint}"
    return "fields"


def detect_layout(rows: Rows, kind: str, names: dict[str, str], template: PromptTemplate | None,
                  where: str, more: Callable[[], Iterable[tuple[int, Any]]] | None = None) -> Layout:
    """The layout of one file, by a vote of its first rows; raises the one-sentence hint for a known layout
    that preftune does not read. Field names the user set switch detection off.

    `rows` is iterated only as far as the vote needs; a decision that needs every row (whether any Alpaca row
    has a history) iterates `more()` instead when given (every row, without keeping them in memory)."""
    if names != DEFAULT_NAMES:
        return fields_layout(names, template)
    votes: Counter[str] = Counter()
    for _, obj in rows:
        if not isinstance(obj, Bad):
            votes[_row_layout(obj, kind, template)] += 1
            if sum(votes.values()) >= VOTERS:
                break
    best = votes.most_common(1)[0][0] if votes else "fields"
    if best.startswith("hint:"):
        label, advice = _HINTS[best[5:]]
        raise PreftuneError(f"{where} looks like {label}; {advice}")
    if template is not None and best in ("sharegpt", "sharegpt-messages", "openai", "messages"):
        raise PreftuneError(f"{where} holds {best} rows, whose prompt is already a message list; "
                            "--prompt-template applies to rows with flat fields, leave it out")
    if best.startswith("sharegpt"):
        return _sharegpt(kind, "messages" if best == "sharegpt-messages" else "conversations")
    if best == "openai":
        return _openai()
    if best == "messages":
        return _messages_sft()
    if best == "alpaca":
        # Earlier turns and a system prompt only fit in message lists; without them the prompt stays a string
        # (no chat template needed), as plain prompt/chosen/rejected data.
        uses_system = template is not None and "system" in template.names
        def chat_row(obj: Any) -> bool:
            return isinstance(obj, dict) and bool(obj.get("history") or (obj.get("system") and not uses_system))

        chat = any(chat_row(obj) for _, obj in (rows if more is None else more()))
        return _alpaca(template, chat)
    return fields_layout(names, template)
