"""The token limits a run trains with: the limits asked for, capped to the model's positions.

`train` and `inspect` both call `effective_limits`, so the truncation `inspect` reports is the truncation training
does (before, inspect counted at the uncapped 1024/512 while train capped to the model: a 5x under-report).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    max_length: int
    max_prompt_length: int
    note: str | None = None  # the line saying they were capped, None when they fit


def effective_limits(max_length: int, max_prompt_length: int, context: int | None) -> Limits:
    """`max_length` capped at a model's `context` positions (positions past it were never trained); the prompt
    limit then keeps its value if it is below the cap, else half of it."""
    if context is None or max_length <= context:
        return Limits(max_length, max_prompt_length)
    prompt = max_prompt_length if max_prompt_length < context else context // 2
    also = f" and max_prompt_length {max_prompt_length} to {prompt}" if prompt != max_prompt_length else ""
    return Limits(context, prompt,
                  f"max_length {max_length} is more than the model's {context} positions: capped it to {context}{also}")
