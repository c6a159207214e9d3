"""Layouts whose label needs reading: each turns a row into the rows of its pairs (``Layout.expand``).

==================  ======================================================================================
layout              a row (one line) and how it becomes pairs
==================  ======================================================================================
llamafactory-v1     ``{"chosen_messages": [...], "rejected_messages": [...]}``, whole conversations with content
                    parts ``{"type": "text", "value": ...}``: the shared leading messages are the prompt
                    (``loss_weight`` is not read: DPO trains the reply where the two differ)
argilla             ``{"instruction": "2+2?", "chosen_response": "4", "rejected_response": "5"}``: a user turn
                    and two assistant replies (chat template applied)
nemo                ``{"prompt": "<rendered turns>", "chosen_response": "4", "rejected_response": "5"}`` (NeMo-
                    Aligner's DPO format: the prompt is already rendered text, so the texts stay strings)
helpsteer2          ``{"prompt": "2+2?", "response_1": "4", "response_2": "5", "preference_strength": -2}``: the
                    sign decides (negative: response_1 is better, positive: response_2), 0 is a tie, dropped
                    and counted; ``<extra_id_1>User``/``Assistant`` turns in the prompt become messages
shp                 ``{"history": "post", "human_ref_A": "a", "human_ref_B": "b", "labels": 1}`` (Stanford
                    SHP: labels 1 = A is preferred, 0 = B)
nectar              ``{"prompt": "\\n\\nHuman: 2+2?\\n\\nAssistant:", "answers": [{"answer": "4", "rank": 1},
                    ...]}``: answers ordered by ``rank`` (1 = best, not their place in the list) and paired by
                    the ``ranked`` rule; each answer follows the prompt's "Assistant:" after a space
==================  ======================================================================================
"""

from __future__ import annotations

import re
from typing import Any

from preftune.data.fields import MISSING, Problem, Skip
from preftune.data.layouts import RANKED_FROM, Layout
from preftune.data.ranked import rank_pairs
from preftune.data.rows import type_name

_NEMO_TURN = re.compile(r"<extra_id_1>(User|Assistant)\n")


def _as(role: str, value: Any) -> Any:
    """A string as a one-message list (so the row is conversational); anything else as it is, for the checks."""
    return [{"role": role, "content": value}] if isinstance(value, str) else value


def _user_turns(prompt: Any) -> Any:
    """A HelpSteer2 prompt as messages: its first turn is the user's, later ones follow "<extra_id_1>User\\n" or
    "<extra_id_1>Assistant\\n" markers."""
    if not isinstance(prompt, str):
        return prompt
    parts = _NEMO_TURN.split(prompt)
    msgs = [{"role": "user", "content": parts[0]}]
    for who, text in zip(parts[1::2], parts[2::2]):
        msgs.append({"role": who.lower(), "content": text})
    return msgs


def _number(obj: dict, key: str) -> float | Problem:
    value = obj.get(key, MISSING)
    if value is MISSING:
        return Problem(f"missing field '{key}'")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        return Problem(f"field '{key}' is {type_name(value)}, expected a number")
    return float(value)


def llamafactory_v1() -> Layout:
    names = {"prompt": "prompt", "chosen": "chosen_messages", "rejected": "rejected_messages",
             "completion": "chosen_messages"}
    return Layout("llamafactory-v1", names)


def chosen_response(prompt_key: str) -> Layout:
    """argilla's rows (`instruction`: a question, so message lists) or NeMo-Aligner's (`prompt`: rendered text)."""
    chat = prompt_key == "instruction"

    def expand(obj: dict) -> list[dict]:
        row = {"prompt": obj.get(prompt_key, MISSING), "chosen": obj.get("chosen_response", MISSING),
               "rejected": obj.get("rejected_response", MISSING)}
        if chat:
            row = {"prompt": row["prompt"], "chosen": _as("assistant", row["chosen"]),
                   "rejected": _as("assistant", row["rejected"])}
        return [row]

    names = {"prompt": prompt_key, "chosen": "chosen_response", "rejected": "rejected_response",
             "completion": "chosen_response"}
    return Layout("argilla" if chat else "nemo", names, {}, True, expand)


def helpsteer2() -> Layout:
    def expand(obj: dict) -> list[Any] | Problem:
        strength = _number(obj, "preference_strength")
        if isinstance(strength, Problem):
            return strength
        if strength == 0:
            return [Skip("tie")]
        better, worse = ("response_1", "response_2") if strength < 0 else ("response_2", "response_1")
        return [{"prompt": _user_turns(obj.get("prompt", MISSING)), "chosen": _as("assistant", obj.get(better, MISSING)),
                 "rejected": _as("assistant", obj.get(worse, MISSING))}]

    names = {"prompt": "prompt", "chosen": "response_1/response_2", "rejected": "response_1/response_2",
             "completion": "response_1/response_2"}
    return Layout("helpsteer2", names, {}, True, expand)


def shp() -> Layout:
    def expand(obj: dict) -> list[Any] | Problem:
        label = _number(obj, "labels")
        if isinstance(label, Problem):
            return label
        if label not in (0, 1):
            return Problem(f"field 'labels' is {label:g}, expected 1 (A is preferred) or 0 (B is)")
        better, worse = ("human_ref_A", "human_ref_B") if label == 1 else ("human_ref_B", "human_ref_A")
        return [{"prompt": obj.get("history", MISSING), "chosen": _as("assistant", obj.get(better, MISSING)),
                 "rejected": _as("assistant", obj.get(worse, MISSING))}]

    names = {"prompt": "history", "chosen": "human_ref_A/human_ref_B", "rejected": "human_ref_A/human_ref_B",
             "completion": "human_ref_A/human_ref_B"}
    return Layout("shp", names, {}, True, expand)


def _nectar_answers(obj: dict) -> list[tuple[float, str]] | Problem:
    answers = obj.get("answers", MISSING)
    if answers is MISSING:
        return Problem("missing field 'answers'")
    if not isinstance(answers, list) or len(answers) < 2:
        n = len(answers) if isinstance(answers, list) else 0
        return Problem(f"field 'answers' holds {n} answers, expected at least 2 with ranks"
                       if isinstance(answers, list) else f"field 'answers' is {type_name(answers)}, expected a list")
    out = []
    for i, item in enumerate(answers, start=1):
        if not isinstance(item, dict):
            return Problem(f"field 'answers' item {i} is {type_name(item)}, expected an object with answer and rank")
        rank = _number(item, "rank")
        if isinstance(rank, Problem):
            return Problem(f"field 'answers' item {i}: {rank.reason}")
        out.append((rank, item.get("answer", MISSING)))
    return sorted(out, key=lambda a: a[0])  # stable: equal ranks keep their order, and are ties anyway


def nectar(ranked: str, kind: str) -> Layout:
    def spaced(prompt: Any, answer: Any) -> Any:
        # HH-RLHF's convention, which Nectar's prompts follow: "Assistant: reply", one space after the colon
        if isinstance(prompt, str) and isinstance(answer, str) and prompt.endswith(":") and answer[:1].strip():
            return " " + answer
        return answer

    def expand(obj: dict) -> list[Any] | Problem:
        answers = _nectar_answers(obj)
        if isinstance(answers, Problem):
            return answers
        prompt = obj.get("prompt", MISSING)
        if kind == "sft":
            return [{"prompt": prompt, "completion": spaced(prompt, answers[0][1])}]
        out: list[Any] = []
        for pair in rank_pairs(len(answers), [rank for rank, _ in answers], ranked):
            if isinstance(pair, Skip):
                out.append(pair)
            else:
                i, j = pair
                out.append({"prompt": prompt, "chosen": spaced(prompt, answers[i][1]),
                            "rejected": spaced(prompt, answers[j][1]), RANKED_FROM: len(answers)})
        return out

    names = {"prompt": "prompt", "chosen": "answers", "rejected": "answers", "completion": "answers"}
    return Layout("nectar", names, {}, True, expand)
