"""Where a value lives in a row: field paths (``meta.question``, ``answers.0``), prompts built from several fields
(`PromptTemplate`), and the two ways a row part can fail to be a value: a `Problem` (the row is invalid) or a
`Skip` (the row is well formed but holds nothing to train on: an empty answer, two identical answers, a tie; it
is dropped and counted, never refused).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from preftune.data.rows import type_name
from preftune.errors import PreftuneError

MISSING: Any = object()


@dataclass(frozen=True)
class Skip:
    """A row (or one pair of it) with nothing to train on, by category: "empty answer", "identical answers",
    "tie"."""

    reason: str


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
