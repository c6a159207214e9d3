"""Prompts to sample from, out of any file preftune reads, each with the place it came from.

What a row gives, tried in this order:

* its prompt field (`prompt_field`, a dotted path; a string or a list of chat messages): a prompts file, or the
  prompts of a preference or SFT file in the plain layout;
* a `messages` list (chat rows): the messages before the last assistant turn, so an SFT conversation gives its
  question and a conversation that ends with the user is taken whole;
* anything else `preftune train` or `sft` reads (ShareGPT, OpenAI preference, Alpaca, implicit prompts): the
  prompts of the records `preftune.data.load_records` makes of it;
* a .txt file: one prompt a line.

A prompt that repeats an earlier one is used once (a pairs file holds many pairs per prompt); `Prompts.repeated`
counts them. Each prompt keeps its position among the distinct prompts (`index`): it seeds the prompt's answers
and says which process samples it, so neither depends on how a run is split.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from preftune.data.layouts import MISSING, get_path
from preftune.data.load import load_records
from preftune.data.sources import Bad, Input, iter_rows, resolve
from preftune.data.stats import value_key
from preftune.data.validate import messages, text
from preftune.errors import PreftuneError


@dataclass
class Prompt:
    index: int  # position among the distinct prompts
    value: str | list[dict]  # as in the data: a string or chat messages
    where: str  # "prompts.jsonl line 7"


@dataclass
class Prompts:
    prompts: list[Prompt]
    repeated: int = 0  # rows whose prompt repeats an earlier one
    how: str = "prompt field"  # what the rows gave: "prompt field", "chat messages", "records", "text lines"
    sources: list[str] = field(default_factory=list)


def load_prompts(source: Any, *, prompt_field: str = "prompt") -> Prompts:
    """The distinct prompts of `source` (a file, folder, glob or list, as `train` takes), in file order."""
    if isinstance(source, (str, Path)) and Path(source).suffix.lower() == ".txt" and Path(source).is_file():
        found, how = _text_lines(Path(source)), "text lines"
    else:
        inputs = resolve(source)
        first = _first_row(inputs)
        if get_path(first, prompt_field) is not MISSING:
            found, how = _fields(inputs, prompt_field), "prompt field"
        elif isinstance(first.get("messages"), list) and prompt_field == "prompt":
            found, how = _fields(inputs, "messages"), "chat messages"
        else:
            found, how = _records(source, prompt_field, inputs[0].name, list(first)), "records"
    out = Prompts([], how=how, sources=[str(s) for s in (source if isinstance(source, list) else [source])])
    seen: set[str] = set()
    for value, where in found:
        key = value_key(value)
        if key in seen:
            out.repeated += 1
            continue
        seen.add(key)
        out.prompts.append(Prompt(len(out.prompts), value, where))
    if not out.prompts:
        raise PreftuneError(f"{out.sources[0]} holds no prompts; pass a file with a {prompt_field!r} field, chat "
                            "messages, preference or SFT rows, or a .txt file with one prompt a line.")
    return out


def _text_lines(path: Path) -> Iterator[tuple[str, str]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise PreftuneError(f"cannot read prompt file {path} ({e}).") from None
    return ((ln, f"{path} line {n}") for n, ln in enumerate(lines, 1) if ln.strip())


def _first_row(inputs: list[Input]) -> dict:
    for inp in inputs:
        for chunk in iter_rows(inp, "train"):
            for row, obj in chunk:
                if isinstance(obj, Bad):
                    raise PreftuneError(f"{inp.name} {inp.unit} {row}: {obj.reason}.")
                if not isinstance(obj, dict):
                    raise PreftuneError(f"{inp.name} {inp.unit} {row} is not an object; prompts come from rows "
                                        "like {\"prompt\": \"...\"}.")
                return obj
    raise PreftuneError(f"{inputs[0].name} holds no rows.")


def _fields(inputs: list[Input], name: str) -> Iterator[tuple[str | list[dict], str]]:
    for inp in inputs:
        for chunk in iter_rows(inp, "train"):
            for row, obj in chunk:
                where = f"{inp.name} {inp.unit} {row}"
                value = _prompt_of(obj, name, where)
                yield value, where


def _prompt_of(obj: Any, name: str, where: str) -> str | list[dict]:
    if isinstance(obj, Bad):
        raise PreftuneError(f"{where}: {obj.reason}.")
    raw = get_path(obj, name) if isinstance(obj, dict) else MISSING
    value = text(raw, name) if isinstance(raw, str) or raw is MISSING else messages(raw, name)
    if isinstance(value, tuple):  # validate's (reason,)
        hint = "; pass --prompt-field NAME for another column" if raw is MISSING else ""
        raise PreftuneError(f"{where}: {value[0]}{hint}.")
    if name == "messages" and isinstance(value, list):
        if value[-1]["role"] == "assistant":
            value = value[:-1]  # the conversation's answer; what comes before it is the prompt
        if not value:
            raise PreftuneError(f"{where}: field 'messages' holds only an assistant message, no prompt.")
    return value


def _records(source: Any, prompt_field: str, name: str, fields: list[str]) -> Iterator[tuple[str | list[dict], str]]:
    """The prompts of preference records, else of SFT records (every layout `train` and `sft` read)."""
    for kind in ("preference", "sft"):
        try:
            loaded = load_records(source, kind=kind, prompt_field=prompt_field)
            return ((r["prompt"], where) for r, where in zip(loaded.records, loaded.origins))
        except PreftuneError:
            continue
    shown = ", ".join(fields[:8]) + (" ..." if len(fields) > 8 else "")
    raise PreftuneError(f"{name} has no {prompt_field!r} field in its first row (its fields: {shown}), no chat "
                        "messages, and is neither preference nor SFT data that train reads; pass --prompt-field "
                        "NAME for the column that holds the prompts.")
