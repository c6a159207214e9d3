"""Messages as every layout spells them, normalised to what chat templates read.

Read: ``{"role", "content"}``; ShareGPT's ``{"from", "value"}`` (speakers human, gpt, system, and LLaMA-Factory's
function_call / observation for a tool call and its result); content as a list of parts, ``{"type": "text",
"text": ...}`` (OpenAI) or ``{"type": "text", "value": ...}`` (LLaMA-Factory v1), text parts joined with a
newline as vLLM does for text-only models; an assistant message's ``tool_calls`` and a tool message's
``tool_call_id`` / ``name`` (kept for the template, as TRL passes them); a row's ``tools`` column (a list of JSON
schemas, or that list as JSON text), handed to the chat template. A part of another type (an image, audio) makes
the row invalid, naming the type. A chosen/rejected given as one message object counts as a one-message list.
"""

from __future__ import annotations

import json
from typing import Any

from preftune.data.fields import MISSING, Problem, Skip
from preftune.data.layouts import SHAREGPT_ROLES
from preftune.data.rows import type_name

Reason = tuple[str]  # a failed check: (why,), told apart from a valid value by its type
PART_KEYS = ("text", "value")
TOOL_CALL_PARTS = ("tool_call", "tool_calls")  # LLaMA-Factory v1's parts holding a call as JSON text


def messages(value: Any, name: str, *, allow_string: str | None = None, answer: bool = False) -> list[dict] | Reason | Skip:
    """A message-list part normalised to [{"role", "content", ...}], or (reason,); an empty answer (no message,
    or only blank text and no tool call) is Skip("empty answer") when `answer`.

    `allow_string` is the role a plain string is wrapped into (a string prompt next to message completions).
    """
    if value is MISSING:
        return (f"missing field '{name}'",)
    if isinstance(value, Problem):
        return (value.reason,)
    if isinstance(value, str) and allow_string:
        value = [{"role": allow_string, "content": value}]
    if isinstance(value, dict):  # ShareGPT's chosen/rejected: one message object
        value = [value]
    if not isinstance(value, list):
        return (f"field '{name}' is {type_name(value)}, expected a list of messages",)
    out = []
    for i, msg in enumerate(value, start=1):
        one = message(msg, f"field '{name}' message {i}")
        if isinstance(one, str):
            return (one,)
        out.append(one)
    if answer and not any(m["content"].strip() or m.get("tool_calls") for m in out):
        return Skip("empty answer")
    return out if out else (f"field '{name}' is empty",)


def message(msg: Any, where: str) -> dict | str:
    """One message normalised, or the reason it cannot be read."""
    if not isinstance(msg, dict):
        return f"{where} is {type_name(msg)}, expected an object with role and content"
    calls = msg.get("tool_calls")
    if "role" not in msg and "content" not in msg and ("from" in msg or "value" in msg):
        who, content = msg.get("from", MISSING), msg.get("value", MISSING)
        if who is MISSING or content is MISSING:
            return f"{where} has no '{'from' if who is MISSING else 'value'}'"
        role = SHAREGPT_ROLES.get(who) if isinstance(who, str) else None
        if role is None:
            return f"{where} is from {who!r}; ShareGPT speakers are human, gpt, system, function_call and observation"
        if who == "function_call":
            calls, content = _json_calls(content, where), ""
            if isinstance(calls, str):
                return calls
    else:
        role, content = msg.get("role", MISSING), msg.get("content", MISSING)
        if content in (MISSING, None) and calls:
            content = ""  # an assistant turn that only calls tools
        if role is MISSING or content is MISSING:
            return f"{where} has no '{'role' if role is MISSING else 'content'}'"
        if not isinstance(role, str) or not role:
            return f"{where} role is {type_name(role)}, expected a string"
    if isinstance(content, list):
        joined = _parts(content, where)
        if isinstance(joined, str):
            return joined
        content, more = joined
        calls = (calls or []) + more if more else calls
    elif not isinstance(content, str):
        return f"{where} content is {type_name(content)}, expected a string or a list of text parts"
    out: dict[str, Any] = {"role": role, "content": content}
    if calls is not None:
        if not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls):
            return f"{where} tool_calls is {type_name(calls)}, expected a list of objects"
        if calls:
            out["tool_calls"] = calls
    out.update({k: msg[k] for k in ("tool_call_id", "name") if isinstance(msg.get(k), str)})
    return out


def _parts(content: list, where: str) -> tuple[str, list[dict]] | str:
    """(joined text, tool calls) of a content-part list, or the reason a part cannot be read."""
    texts: list[str] = []
    calls: list[dict] = []
    for j, part in enumerate(content, start=1):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            text = next((part[k] for k in PART_KEYS if isinstance(part.get(k), str)), None)
            if text is None:
                return f"{where} part {j} is a text part without a 'text' or 'value' string"
            texts.append(text)
        elif kind in TOOL_CALL_PARTS:
            more = _json_calls(part.get("value", part.get(kind, MISSING)), f"{where} part {j}")
            if isinstance(more, str):
                return more
            calls += more
        else:
            what = f"a {kind!r} part" if isinstance(kind, str) else f"part {j} of type {type_name(part)}"
            return f"{where} has {what}; only text parts are read ({{\"type\": \"text\", \"text\" or \"value\": ...}})"
    return "\n".join(texts), calls


def _json_calls(value: Any, where: str) -> list[dict] | str:
    """LLaMA-Factory's tool call(s): {"name", "arguments"} or a list of them, as JSON text or already parsed,
    in the OpenAI form chat templates read ({"type": "function", "function": {...}})."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):
            return f"{where} holds a tool call that is not valid JSON"
    calls = value if isinstance(value, list) else [value]
    if not all(isinstance(c, dict) and isinstance(c.get("name", c.get("function")), (str, dict)) for c in calls):
        return f"{where} holds a tool call without a name; write {{\"name\": ..., \"arguments\": {{...}}}}"
    return [c if "function" in c else {"type": "function", "function": c} for c in calls]


def tools_of(row: dict) -> list[dict] | None | Problem:
    """A row's `tools` column: a list of tool schemas (JSON objects), given as a list or as JSON text."""
    value = row.get("tools")
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):
            return Problem("field 'tools' is text that is not valid JSON; give a list of tool schemas")
    value = [value] if isinstance(value, dict) else value
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        return Problem(f"field 'tools' is {type_name(value)}, expected a list of tool schemas (JSON objects)")
    return value or None
