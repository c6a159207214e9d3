"""Which layout a file uses, by a vote of its first rows' keys; layouts preftune does not read are refused with the
one sentence that names the flags or conversion that read them.

Field names the user set switch detection off, except where following them would train wrong labels: naming the
answer columns of a layout whose label is a sign, a rank or a column of its own (HelpSteer2, Nectar, SHP,
PKU-SafeRLHF) is refused, and Alpaca rows keep their prompt, history and system turn whatever answer fields are
named.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from preftune.data import converters
from preftune.data.fields import PromptTemplate
from preftune.data.layouts import DEFAULT_NAMES, Layout, alpaca, fields_layout, messages_sft, openai, sharegpt
from preftune.data.rows import Bad, Rows
from preftune.errors import PreftuneError

# How many parsed rows vote on the layout and format; enough to outvote a few broken rows at the top of a file.
VOTERS = 1000

# Layouts preftune does not read, by the keys that give them away: (label, advice). The advice names the flag or
# conversion that reads the data, so that the error is one actionable sentence.
_HINTS = {
    "orca": ("Orca-style pairs (system, question, chosen, rejected) with no prompt field",
             "build the prompt with --prompt-template \"{system}\\n\\n{question}\""),
    "question": ("pairs whose prompt is in 'question'", "pass --prompt-field question"),
    "query": ("pairs whose prompt is in 'query'", "pass --prompt-field query"),
    "input": ("pairs whose prompt is in 'input'",
              "pass --prompt-field input (or --prompt-template \"{system}\\n\\n{input}\" to keep a system field)"),
    "stack": ("StackExchange-paired data (question, response_j, response_k)",
              "pass --prompt-field question --chosen-field response_j --rejected-field response_k"),
    "pku": ("PKU-SafeRLHF-style data (response_0, response_1 and which is better)",
            "which response wins depends on the label you train for, so write chosen = response_<better_response_id> "
            "(helpfulness) or response_<safer_response_id> (harmlessness) and rejected = the other one first; "
            "naming the columns with --chosen-field/--rejected-field would train every row whose better answer is "
            "response_1 backwards"),
    "kto": ("unpaired KTO-style data (prompt, completion, label)",
            "train it with --loss kto (or apo_zero_unpaired), which reads the labels; the other losses need a "
            "chosen and a rejected answer per prompt"),
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
    "rated-single": ("single rated responses (HelpSteer-style 'response' with helpfulness scores)",
                     "pair two responses to each prompt first (nvidia/HelpSteer2's preference file is read as it "
                     "is), or train the good responses with `preftune sft --completion-field response`"),
    "text": ("plain text (a 'text' field)",
             "preference training needs prompt/chosen/rejected fields, SFT needs prompt/completion"),
}
# Layouts whose better answer is not a column: naming their answer columns trains some rows backwards.
_LABELLED = {
    "helpsteer2": ("HelpSteer2 preference data (response_1, response_2, preference_strength)",
                   "which response is better is the sign of preference_strength (negative: response_1), not a column"),
    "shp": ("SHP data (human_ref_A, human_ref_B, labels)",
            "which answer is preferred is in labels (1: human_ref_A), not a column"),
    "nectar": ("Nectar-style ranked answers ('answers' with ranks)",
               "the best answer is the one ranked 1, not the first in the list; pick the pairs with --ranked"),
    "hint:pku": _HINTS["pku"],
}


def _row_layout(obj: dict, kind: str, template: PromptTemplate | None) -> str:
    """The layout one row's keys point to: a layout name, or "hint:<key of _HINTS>"."""
    has = obj.__contains__
    answers = has("chosen") and has("rejected")
    sft_answer = kind == "sft" and (has("completion") or has("chosen"))
    if has("prompt") and (answers or sft_answer):
        return "fields"
    if has("chosen_messages") and has("rejected_messages"):
        return "llamafactory-v1"
    if has("chosen_response") and has("rejected_response"):
        return "argilla" if has("instruction") else "nemo"
    if all(map(has, ("response_1", "response_2", "preference_strength"))):
        return "helpsteer2"
    if all(map(has, ("human_ref_A", "human_ref_B", "labels"))):
        return "shp"
    if has("prompt") and isinstance(obj.get("answers"), list) and any(
            isinstance(a, dict) and "rank" in a for a in obj["answers"]):
        return "nectar"
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
        for key, hint in (("question", "orca" if has("system") else "question"), ("query", "query"),
                          ("input", "input")):
            if has(key):
                return f"hint:{hint}"
        return "fields"  # implicit prompt
    if kind == "sft" and has("messages"):
        return "messages"
    for keys, hint in ((("response_j", "response_k"), "stack"), (("response_0", "response_1"), "pku"),
                       (("prompt", "completion", "label"), "kto"), (("prompt", "completion"), "sft"),
                       (("messages",), "chat-sft"), (("completions",), "rated"),
                       (("prompt", "response", "helpfulness"), "rated-single"), (("text",), "text")):
        if all(map(has, keys)) and not (kind == "sft" and hint in ("sft", "kto")):
            return f"hint:{hint}"
    return "fields"


def _vote(rows: Iterable[tuple[int, Any]], kind: str, template: PromptTemplate | None) -> str:
    votes: Counter[str] = Counter()
    for _, obj in rows:
        if not isinstance(obj, Bad):
            votes[_row_layout(obj, kind, template)] += 1
            if sum(votes.values()) >= VOTERS:
                break
    return votes.most_common(1)[0][0] if votes else "fields"


def detect_layout(rows: Rows, kind: str, names: dict[str, str], template: PromptTemplate | None,
                  where: str, more: Callable[[], Iterable[tuple[int, Any]]] | None = None,
                  ranked: str = "best-vs-next") -> Layout:
    """The layout of one file, by a vote of its first rows; raises the one-sentence hint for a known layout
    that preftune does not read.

    `rows` is iterated only as far as the vote needs; a decision that needs every row (whether any Alpaca row
    has a history) iterates `more()` instead when given (every row, without keeping them in memory)."""
    best = _vote(rows, kind, template)
    if names != DEFAULT_NAMES:
        return _named(best, kind, names, template, where, rows if more is None else more, ranked)
    if best.startswith("hint:"):
        label, advice = _HINTS[best[5:]]
        raise PreftuneError(f"{where} looks like {label}; {advice}")
    if template is not None and best in ("sharegpt", "sharegpt-messages", "openai", "messages", "llamafactory-v1",
                                         "argilla", "nemo", "helpsteer2", "shp", "nectar"):
        raise PreftuneError(f"{where} holds {best} rows, whose prompt is its own field or a message list; "
                            "--prompt-template applies to rows with flat fields, leave it out")
    if best == "alpaca":
        return alpaca(template, _alpaca_chat(template, rows if more is None else more), kind, ranked)
    return _LAYOUTS.get(best, lambda k, r: fields_layout(names, template))(kind, ranked)


_LAYOUTS: dict[str, Callable[[str, str], Layout]] = {
    "sharegpt": lambda kind, ranked: sharegpt(kind, "conversations"),
    "sharegpt-messages": lambda kind, ranked: sharegpt(kind, "messages"),
    "openai": lambda kind, ranked: openai(),
    "messages": lambda kind, ranked: messages_sft(),
    "llamafactory-v1": lambda kind, ranked: converters.llamafactory_v1(),
    "argilla": lambda kind, ranked: converters.chosen_response("instruction"),
    "nemo": lambda kind, ranked: converters.chosen_response("prompt"),
    "helpsteer2": lambda kind, ranked: converters.helpsteer2(),
    "shp": lambda kind, ranked: converters.shp(),
    "nectar": lambda kind, ranked: converters.nectar(ranked, kind),
}


def _alpaca_chat(template: PromptTemplate | None, rows: Any) -> bool:
    """Earlier turns and a system prompt only fit in message lists; without them in any row the prompt stays a
    string (no chat template needed), as plain prompt/chosen/rejected data."""
    uses_system = template is not None and "system" in template.names
    source = rows() if callable(rows) else rows
    return any(isinstance(obj, dict) and bool(obj.get("history") or (obj.get("system") and not uses_system))
               for _, obj in source)


def _named(best: str, kind: str, names: dict[str, str], template: PromptTemplate | None, where: str, rows: Any,
           ranked: str) -> Layout:
    """The layout for field names the user set: those fields, except as the module says."""
    answers_named = any(names[k] != DEFAULT_NAMES[k] for k in ("chosen", "rejected", "completion"))
    if best in _LABELLED and answers_named:
        label, advice = _LABELLED[best]
        raise PreftuneError(f"{where} looks like {label}; {advice}: leave out --chosen-field/--rejected-field "
                            "and preftune reads the label" if not best.startswith("hint:") else
                            f"{where} looks like {label}; {advice}")
    if best == "alpaca" and template is None and names["prompt"] in ("prompt", "instruction"):
        return alpaca(None, _alpaca_chat(None, rows), kind, ranked, names)
    return fields_layout(names, template)
