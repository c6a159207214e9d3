"""Row layouts: where a row keeps its prompt and answers, for the layouts other projects publish.

A `Layout` reads the raw parts of a row (``value(row, "prompt" | "chosen" | "rejected" | "completion")``);
`preftune.data.validate` then checks and normalises them. Layouts whose rows hold more than one pair, or whose
labels need reading (ranked answers, a preference sign), first turn a row into the rows of its pairs
(``Layout.expand``, `preftune.data.converters`). `preftune.data.detect` picks the layout from the rows' keys when
the field names are left at their defaults. Each layout, one line:

==============  ==========================================================================================
layout          a row (one line)
==============  ==========================================================================================
fields          ``{"prompt": "2+2=", "chosen": "4", "rejected": "5"}``; message lists work too, and without a
                prompt field the shared beginning of chosen and rejected is the prompt (implicit prompt)
sharegpt        ``{"conversations": [{"from": "human", "value": "2+2="}], "chosen": {"from": "gpt", "value":
                "4"}, "rejected": {"from": "gpt", "value": "5"}}`` (LLaMA-Factory's DPO format; a ``system``
                field becomes a system message, ``function_call``/``observation`` turns tool calls and results)
openai          ``{"input": {"messages": [{"role": "user", "content": "2+2="}]}, "preferred_output":
                [{"role": "assistant", "content": "4"}], "non_preferred_output": [...]}``
alpaca          ``{"instruction": "Add.", "input": "2+2", "output": ["4", "5"], "history": [["hi", "hello"]]}``
                (``output`` = answers best first, paired by the ``ranked`` rule, or ``chosen``/``rejected``;
                ``history`` and ``system`` become earlier turns and a system message)
messages        ``{"messages": [...]}`` (SFT only: the last message is the answer)
==============  ==========================================================================================
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from preftune.data.fields import MISSING, Problem, PromptTemplate, get_path
from preftune.data.ranked import RANKED_RULES, rank_pairs
from preftune.data.rows import type_name

RANKED_FROM = "ranked_from"  # on the rows of a ranked row's pairs: how many answers it ranked (for the summary)
DEFAULT_NAMES = {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected", "completion": "completion"}
# How the summary names a layout ("fields" goes unnamed: it is the plain prompt/chosen/rejected data).
LAYOUT_LABELS = {"sharegpt": "ShareGPT", "openai": "OpenAI preference", "alpaca": "Alpaca", "messages": "chat messages",
                 "llamafactory-v1": "LLaMA-Factory v1", "argilla": "argilla", "nemo": "NeMo",
                 "helpsteer2": "HelpSteer2 preference", "nectar": "Nectar", "shp": "SHP"}
# ShareGPT speakers -> chat-template roles (LLaMA-Factory's names: "function_call" is the assistant calling a tool,
# "observation" the tool's answer).
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
                  "function_call": "assistant", "observation": "tool"}


@dataclass
class Layout:
    """How to read the prompt and answers of one layout; `value` gives MISSING, a Problem or the raw value.

    With `expand`, a row first becomes the rows of its pairs (``{"prompt", "chosen", "rejected"}`` or
    ``{"prompt", "completion"}``, maybe "tools"), or a Problem, and `value` reads those; `names` still say which
    fields of the file messages talk about."""

    name: str  # "fields", "sharegpt", "openai", "alpaca", "messages", or a converter's name
    names: dict[str, str]  # part -> the field named in messages about it
    getters: dict[str, Callable[[dict], Any]] = field(default_factory=dict)
    # a prompt the user named (a field or a template) is never "implicit": a missing one is reported as missing
    named_prompt: bool = False
    expand: Callable[[dict], Any] | None = None

    def value(self, obj: dict, part: str) -> Any:
        if self.expand is not None:
            return obj.get(part, MISSING)
        getter = self.getters.get(part)
        return getter(obj) if getter else get_path(obj, self.names[part])

    def rows(self, obj: dict) -> list[dict] | Problem:
        """The rows of the pairs `obj` holds (itself, for layouts without `expand`)."""
        return [obj] if self.expand is None else self.expand(obj)


def fields_layout(names: dict[str, str], template: PromptTemplate | None, name: str = "fields") -> Layout:
    getters = {"prompt": template.fill} if template else {}
    named = template is not None or names["prompt"] != "prompt"
    return Layout(name, dict(names), getters, named)


def sharegpt(kind: str, key: str = "conversations") -> Layout:
    """LLaMA-Factory's sharegpt format: the conversation in `key` ("conversations", or "messages" with role/content
    tags), a `system` column, chosen/rejected as one message each, a `tools` column for tool calls."""
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


def openai() -> Layout:
    names = {"prompt": "input.messages", "chosen": "preferred_output", "rejected": "non_preferred_output",
             "completion": "preferred_output"}
    return Layout("openai", names, {}, True)


def messages_sft() -> Layout:
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


def alpaca(template: PromptTemplate | None, chat: bool, kind: str, ranked: str,
           names: dict[str, str] | None = None) -> Layout:
    """Alpaca rows (LLaMA-Factory's alpaca format): the user turn is instruction + "\\n" + input (LLaMA-Factory
    joins them so) or the prompt template; with `chat`, history pairs and the system field come first as
    messages, so earlier turns are kept, not dropped. ``output`` lists answers best first (LLaMA-Factory's
    ranking files): the `ranked` rule makes the pairs. `names`, when the user named the answer fields
    (``--chosen-field output.0``), says where the answers are instead; the prompt, history and system stay."""
    uses_system = template is not None and "system" in template.names
    named = {k: v for k, v in (names or {}).items() if k != "prompt" and v != DEFAULT_NAMES[k]}

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

    def answers(obj: dict) -> list[tuple[Any, Any, int]] | Problem:
        if "chosen" in named or "rejected" in named:
            return [(get_path(obj, named.get("chosen", "chosen")), get_path(obj, named.get("rejected", "rejected")), 2)]
        out = obj.get("output", MISSING)
        if not isinstance(out, list):
            return [(obj.get("chosen", MISSING), obj.get("rejected", MISSING), 2)]
        if len(out) < 2:
            return Problem(f"field 'output' holds {len(out)} answer{'s' if len(out) != 1 else ''}, expected at "
                           "least 2 (best first)")
        return [(out[i], out[j], len(out)) for i, j in rank_pairs(len(out), None, ranked)]  # type: ignore[misc]

    def expand(obj: dict) -> list[dict] | Problem:
        p = prompt(obj)
        if kind == "sft":
            if "completion" in named:
                return [{"prompt": p, "completion": get_path(obj, named["completion"])}]
            out = obj.get("output", MISSING)
            first = out[0] if isinstance(out, list) and out else out
            return [{"prompt": p, "completion": first if first is not MISSING else obj.get("chosen", MISSING)}]
        pairs = answers(obj)
        if isinstance(pairs, Problem):
            return pairs
        return [{"prompt": p, "chosen": c, "rejected": r, RANKED_FROM: n} for c, r, n in pairs]

    shown = {"prompt": "instruction", "chosen": named.get("chosen", "output"),
             "rejected": named.get("rejected", "output"), "completion": named.get("completion", "output")}
    return Layout("alpaca", shown, {}, True, expand)


__all__ = ["DEFAULT_NAMES", "LAYOUT_LABELS", "Layout", "MISSING", "Problem", "RANKED_RULES", "SHAREGPT_ROLES",
           "alpaca", "fields_layout", "messages_sft", "openai", "sharegpt"]
