"""Pairwise judging of two models' answers, and the win rate with its 95% interval.

The judge protocol (what `preftune eval --judge module:function` calls):

    def judge(prompt, answer_a: str, answer_b: str) -> str:   # "a", "b" or "tie"

`prompt` is the row's prompt as it is in the data: a string, or a list of {"role", "content"} messages for
conversational data. Which model's answer is shown as `answer_a` is decided by a seeded coin flip per
prompt, so a judge that favours a position cannot favour a model; the verdict is mapped back to "model",
"reference" or "tie". A pointwise scorer fits in three lines:

    def judge(prompt, a, b):
        sa, sb = score(prompt, a), score(prompt, b)
        return "a" if sa > sb else "b" if sb > sa else "tie"

`module` is an importable module name (the current directory is searched too) or a path to a .py file.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import os
import random
import reprlib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from preftune.errors import PreftuneError

Judge = Callable[[Any, str, str], str]
Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def import_function(spec: str, what: str = "judge") -> Callable[..., Any]:
    """The function named by `spec`, "module:function" or "path/to/file.py:function" (the current directory is
    searched for a module); one sentence naming `what` it is for when it cannot be imported or is not callable."""
    if not isinstance(spec, str) or spec.count(":") < 1 or not all(spec.rsplit(":", 1)):
        raise PreftuneError(f"a {what} is named as 'module:function' or 'file.py:function', got {spec!r}.")
    module_name, func_name = spec.rsplit(":", 1)
    module = _import(module_name, what)
    func = getattr(module, func_name, None)
    if func is None:
        raise PreftuneError(f"the {what} module {module_name!r} has no function {func_name!r}.")
    if not callable(func):
        raise PreftuneError(f"the {what} {spec!r} is a {type(func).__name__}, not a function.")
    return func


def load_judge(spec: str | Judge) -> Judge:
    """The judge named by `spec` ("module:function" or "path/to/file.py:function"), or a callable as is.

    Raises PreftuneError with one sentence when the module cannot be imported, has no such function, or the
    function cannot be called as judge(prompt, answer_a, answer_b).
    """
    func = spec if callable(spec) else import_function(spec)
    try:
        inspect.signature(func).bind("prompt", "answer a", "answer b")
    except TypeError:
        raise PreftuneError(f"the judge {_name(func)} cannot be called as judge(prompt, answer_a, answer_b); "
                            "give it those three parameters.") from None
    except ValueError:  # builtins without a signature: trust them
        pass
    return func


def _import(module_name: str, what: str):
    if module_name.endswith(".py"):
        path = Path(module_name).expanduser()
        if not path.is_file():
            raise PreftuneError(f"the {what} file {path} does not exist.")
        spec = importlib.util.spec_from_file_location(f"preftune_judge_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # as importlib's own recipe does: a dataclass in the file looks it up
        loader = spec.loader
    else:
        # The console script does not put the current directory on sys.path; `python -m` does. A judge module
        # next to the user's data should load either way.
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.append(os.getcwd())
        loader = None
    try:
        if loader is None:
            return importlib.import_module(module_name)
        loader.exec_module(module)
        return module
    except ImportError as e:
        raise PreftuneError(f"cannot import the {what} module {module_name!r} ({e}); check the name and that "
                            "it is on PYTHONPATH.") from None
    except Exception as e:  # the module's own top-level code failed
        raise PreftuneError(f"importing the {what} module {module_name!r} failed with "
                            f"{type(e).__name__}: {e}.") from None


def _name(func: Any) -> str:
    return f"{getattr(func, '__module__', '?')}:{getattr(func, '__qualname__', type(func).__name__)}"


def function_name(func: Any) -> str:
    """"module:qualname" of a judge function, for messages and provenance."""
    return _name(func)


_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 60


def short(value: Any) -> str:
    """A bounded repr of what a judge returned (a 100 MB string is shown by its first characters)."""
    return _SHORT.repr(value)


def error_text(e: BaseException) -> str:
    """ "ValueError: first line of the message" (at most 200 characters), for a sentence about a judge's failure."""
    lines = str(e).strip().splitlines()
    return type(e).__name__ + (f": {lines[0][:200]}" if lines else "")


def read_verdict(raw: Any) -> str | None:
    """A pairwise judge's answer as "a", "b" or "tie" (case and spaces ignored), None if it is none of them."""
    if not isinstance(raw, str) or len(raw) > 16:
        return None
    verdict = raw.strip().lower()
    return verdict if verdict in ("a", "b", "tie") else None


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a proportion (Wilson, 1927):

        centre = (p + z²/2n) / (1 + z²/n),  half = z / (1 + z²/n) · sqrt(p(1 - p)/n + z²/4n²),  p = s/n

    Unlike p ± z·sqrt(p(1-p)/n) it stays inside [0, 1] and keeps its coverage for small n and p near 0 or 1.
    """
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(max(p * (1 - p) / n + z * z / (4 * n * n), 0.0))
    return (max(0.0, centre - half), min(1.0, centre + half))


def win_rate(verdicts: Sequence[str]) -> dict[str, Any]:
    """Win rate of "model" over "reference" with ties as half a win, and its 95% Wilson interval.

    With ties counted as half a success the Wilson interval is conservative (a tie varies less than a coin
    flip), which is the safe side for "did it help".
    """
    wins, losses, ties = (sum(v == k for v in verdicts) for k in ("model", "reference", "tie"))
    n = wins + losses + ties
    rate = (wins + 0.5 * ties) / n if n else float("nan")
    lo, hi = wilson_interval(wins + 0.5 * ties, n)
    return {"n": n, "wins": wins, "losses": losses, "ties": ties, "win_rate": rate, "ci95": [lo, hi],
            "interval": "Wilson score, 95%, ties counted as half a win"}


def judge_pairs(judge: Judge, prompts: Sequence[Any], model_answers: Sequence[str],
                reference_answers: Sequence[str], *, seed: int = 0) -> list[dict[str, Any]]:
    """Ask `judge` about each (prompt, model answer, reference answer), the model's side chosen by a seeded
    coin flip; returns one row per prompt with the verdict as "model", "reference" or "tie"."""
    rng = random.Random(seed)
    rows = []
    for i, (prompt, mine, theirs) in enumerate(zip(prompts, model_answers, reference_answers)):
        model_first = rng.random() < 0.5
        a, b = (mine, theirs) if model_first else (theirs, mine)
        try:
            raw = judge(prompt, a, b)
        except Exception as e:  # the user's code: name it, one sentence, no traceback
            raise PreftuneError(f"the judge {_name(judge)} raised {type(e).__name__} on prompt {i + 1}: {str(e):.300}.") from None
        verdict = read_verdict(raw)
        if verdict is None:
            raise PreftuneError(f"the judge {_name(judge)} returned {short(raw)} for prompt {i + 1}; it must return "
                                "'a', 'b' or 'tie'.")
        if verdict != "tie":
            verdict = "model" if (verdict == "a") == model_first else "reference"
        rows.append({"prompt": prompt, "model": mine, "reference": theirs,
                     "model_shown_as": "a" if model_first else "b", "verdict": verdict})
    return rows
