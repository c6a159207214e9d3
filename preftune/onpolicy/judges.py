"""Judges that score the answers to a prompt (`preftune pairs`). Four kinds, one protocol each; higher is better.

(a) A pointwise Python function, `--judge my_judges:score` or `--judge path/to/judges.py:score`:

        def score(prompt, answer: str) -> float:          # prompt: a string, or chat messages
            words = answer.split()
            return len(set(words)) / max(len(words), 1)   # e.g. penalise repetition

(b) A pairwise Python function, the protocol `preftune eval --judge` takes (`preftune.judging`):

        def judge(prompt, answer_a: str, answer_b: str) -> str:   # "a", "b" or "tie"
            a, b = len(answer_a.split()), len(answer_b.split())
            return "a" if a < b else "b" if b < a else "tie"     # e.g. prefer the shorter

    Every two distinct answers of a prompt meet once (u·(u-1)/2 calls for u answers); which is shown as `a` is a
    seeded coin per (prompt, pair), so a judge that favours a position favours no answer. An answer's score is
    its wins plus half its ties.

(c) A reward model folder, `--judge path/to/reward-model`: a transformers sequence classifier with one output
    (AutoModelForSequenceClassification, num_labels 1), scored in batches. Each answer is shown to it as its own
    chat template renders (prompt, answer) as a user and an assistant turn (prompt + answer as plain text when
    it has none), cut from the left to its length limit so the answer's end is always seen:

        preftune pairs --model runs/sft/final --prompts prompts.jsonl --judge OpenAssistant/reward-model-deberta-v3-large-v2

(d) An OpenAI-compatible chat-completions endpoint (`--judge-url`, `--judge-model`): `preftune.onpolicy.endpoint`.

A function is pointwise or pairwise by the arguments it takes (`judge_type` decides for one that takes both).
What a judge returns is checked: an exception, no answer within `timeout` seconds, or anything but a finite
number (a verdict for (b)) stops the run with one sentence naming the judge and the prompt's line; what was
written before stays, and the same command continues from there.
"""

from __future__ import annotations

import hashlib
import inspect
import math
import queue
import random
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from preftune.errors import PreftuneError
from preftune.judging import error_text, function_name, import_function, read_verdict, short
from preftune.options import JUDGE_TYPES

__all__ = ["JUDGE_TYPES", "Group", "Judge", "PairwiseJudge", "PointwiseJudge", "coin", "function_judge"]


@dataclass
class Group:
    """One prompt's distinct answers, to be scored together."""

    prompt: Any  # as in the data: a string or chat messages
    answers: list[str]
    where: str  # "prompts.jsonl line 7", for messages
    key: int  # the prompt's index: seeds the pairwise coin


class Judge:
    """Scores each group's answers (one float per answer, higher is better)."""

    kind = "judge"
    name = "judge"

    def score(self, groups: Sequence[Group]) -> list[list[float]]:
        raise NotImplementedError

    def identity(self) -> dict[str, Any]:
        """What a resumed run's judge must match (plain JSON values)."""
        return {"kind": self.kind, "name": self.name}

    def close(self) -> None:
        pass


class _Worker:
    """Runs the user's function in a daemon thread so that a call that hangs can be given up after `timeout`
    seconds (a Python thread cannot be stopped: an abandoned one ends with the process). One thread serves every
    call, so a judge that keeps per-thread state (a database connection) sees one thread."""

    def __init__(self) -> None:
        self._jobs: queue.Queue | None = None

    def call(self, func: Callable[..., Any], args: tuple, timeout: float) -> Any:
        if timeout <= 0:
            return func(*args)
        if self._jobs is None:
            self._jobs = queue.Queue()
            threading.Thread(target=self._serve, args=(self._jobs,), daemon=True, name="preftune-judge").start()
        answer: queue.Queue = queue.Queue(maxsize=1)
        self._jobs.put((func, args, answer))
        try:
            ok, value = answer.get(timeout=timeout)
        except queue.Empty:
            self._jobs = None  # the stuck thread keeps its own queue; the next call starts a fresh one
            raise TimeoutError from None
        if not ok:
            raise value
        return value

    @staticmethod
    def _serve(jobs: queue.Queue) -> None:
        while True:
            func, args, answer = jobs.get()
            try:
                answer.put((True, func(*args)))
            except BaseException as e:  # handed to the caller, who names it
                answer.put((False, e))


def as_score(value: Any) -> float | None:
    """A finite float from what a pointwise judge returned (a number, a numpy or 1-element torch scalar), else None."""
    if value is None or isinstance(value, (bool, str, bytes)):
        return None
    try:
        x = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return x if math.isfinite(x) else None


class _FunctionJudge(Judge):
    def __init__(self, func: Callable[..., Any], name: str, timeout: float):
        self.func, self.name, self.timeout = func, name, timeout
        self._worker = _Worker()

    def identity(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "source": _source_digest(self.func)}

    def _call(self, args: tuple, where: str) -> Any:
        try:
            return self._worker.call(self.func, args, self.timeout)
        except TimeoutError:
            raise PreftuneError(f"the judge {self.name} gave no answer within {self.timeout:g} s on the prompt at "
                                f"{where}; raise --judge-timeout (0 = no limit) or fix the judge.") from None
        except Exception as e:  # the user's code: name it, one sentence, no traceback
            raise PreftuneError(f"the judge {self.name} raised {error_text(e)} on the prompt at {where}.") from None


class PointwiseJudge(_FunctionJudge):
    kind = "pointwise"

    def score(self, groups: Sequence[Group]) -> list[list[float]]:
        out = []
        for g in groups:
            row = []
            for answer in g.answers:
                raw = self._call((g.prompt, answer), g.where)
                x = as_score(raw)
                if x is None:
                    raise PreftuneError(f"the judge {self.name} returned {short(raw)} for an answer to the prompt at "
                                        f"{g.where}; a pointwise judge returns a finite number (higher is better).")
                row.append(x)
            out.append(row)
        return out


class PairwiseJudge(_FunctionJudge):
    kind = "pairwise"

    def __init__(self, func: Callable[..., Any], name: str, timeout: float, seed: int):
        super().__init__(func, name, timeout)
        self.seed = seed

    def score(self, groups: Sequence[Group]) -> list[list[float]]:
        return [self._tournament(g) for g in groups]

    def _tournament(self, g: Group) -> list[float]:
        points = [0.0] * len(g.answers)
        for i in range(len(g.answers)):
            for j in range(i + 1, len(g.answers)):
                i_first = coin(self.seed, g.key, i, j)
                a, b = (i, j) if i_first else (j, i)
                raw = self._call((g.prompt, g.answers[a], g.answers[b]), g.where)
                verdict = read_verdict(raw)
                if verdict is None:
                    raise PreftuneError(f"the judge {self.name} returned {short(raw)} for two answers to the prompt "
                                        f"at {g.where}; a pairwise judge returns 'a', 'b' or 'tie'.")
                if verdict == "tie":
                    points[i] += 0.5
                    points[j] += 0.5
                else:
                    points[a if verdict == "a" else b] += 1.0
        return points


def coin(seed: int, key: int, i: int, j: int) -> bool:
    """Whether answer i is shown first when answers i < j of the prompt with `key` meet: a fair coin of its own
    per (seed, prompt, pair), so the position never depends on which other prompts were judged before."""
    digest = hashlib.blake2b(f"{seed}:{key}:{i}:{j}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "little")).random() < 0.5


def _source_digest(func: Any) -> str | None:
    """A hash of the file that defines `func`: a judge edited between a run and its rerun is another judge."""
    try:
        path = inspect.getsourcefile(func)
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16] if path else None
    except (TypeError, OSError):
        return None


def _arity(func: Callable[..., Any]) -> set[int]:
    """Which of 2 (pointwise) and 3 (pairwise) positional arguments `func` accepts."""
    try:
        sig = inspect.signature(func)
    except (TypeError, ValueError):  # builtins without a signature
        return {2, 3}
    ok = set()
    for n in (2, 3):
        try:
            sig.bind(*range(n))
            ok.add(n)
        except TypeError:
            pass
    return ok


def function_judge(spec: str | Callable[..., Any], *, judge_type: str = "auto", timeout: float = 60.0,
                   seed: int = 0) -> Judge:
    """A pointwise or pairwise judge from a "module:function" / "file.py:function" spec or a callable."""
    func = spec if callable(spec) else import_function(spec, "judge")
    name = spec if isinstance(spec, str) else function_name(func)
    arity = _arity(func)
    if judge_type == "auto":
        if arity == {2, 3}:
            raise PreftuneError(f"the judge {name} can be called with 2 or 3 arguments; pass --judge-type pointwise "
                                "(score(prompt, answer)) or pairwise (judge(prompt, answer_a, answer_b)).")
        judge_type = "pointwise" if 2 in arity else "pairwise" if 3 in arity else "neither"
    if judge_type == "pointwise" and 2 in arity:
        return PointwiseJudge(func, name, timeout)
    if judge_type == "pairwise" and 3 in arity:
        return PairwiseJudge(func, name, timeout, seed)
    raise PreftuneError(f"the judge {name} cannot be called as score(prompt, answer) (pointwise) nor as "
                        "judge(prompt, answer_a, answer_b) (pairwise); give it those parameters.")
