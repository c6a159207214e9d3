"""Callbacks: what the recipe tells the outside world, and the built-in listeners.

The recipe (recipe.py) calls each event on every callback, in order; every method is optional. The progress
bar, the console lines, the benchmark's clocks, trackers and reports all listen here instead of reaching
into the loop.

    on_phase_start(state, name)          a phase begins: the setup's "data" (read, validate, tokenize), "model"
                                         (load, check, forward plan), "prepare" (LoRA, optimizer, engine),
                                         "reference", "resume" (only when resuming), then "steps" (the loop),
                                         "evaluate" (the final evaluation) and "save" (final/)
    on_phase_end(state, name, seconds)   it ended, after `seconds` of wall time (not when it raised)
    on_train_begin(state)      setup done (data, model, reference, optimizer), right before the first step
    on_step_end(state)         after every optimizer step; state.step = steps done
    on_log(state, row)         every metrics.jsonl row; row["split"] is "train" or "eval"; full precision
    on_save(state, path)       after a checkpoint folder or final/ is written
    on_train_end(state)        after final/ is written, or when a signal stopped the run (state.interrupted)

Events are called on every process (state.is_main_process tells which one writes); a callback that writes
files should do so on the main process only.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from preftune.errors import PreftuneError


@dataclass
class TrainState:
    """What a callback may read about the run. The recipe updates it in place as the run goes (during the setup
    phases only config, task and output_dir are set)."""

    config: Any  # TrainConfig
    task: str  # "dpo" or "sft"
    output_dir: Path
    total_steps: int = 0
    steps_per_epoch: int = 0
    step: int = 0  # optimizer steps done
    is_main_process: bool = True
    num_processes: int = 1
    device: Any = None
    model: Any = None  # the module being trained (unwrapped; a PeftModel with LoRA)
    plan: Any = None  # the ForwardPlan every forward of the policy runs (device.plan_forward), as the engine wrapped it
    tokenizer: Any = None
    data_summary: str = ""
    data_info: dict[str, Any] = field(default_factory=dict)
    train_metrics: dict[str, Any] = field(default_factory=dict)  # the last logged train row
    eval_metrics: dict[str, Any] = field(default_factory=dict)  # the last eval row
    final_dir: Path | None = None
    interrupted: bool = False


class Callback:
    """Base class: override the events you need."""

    def on_phase_start(self, state: TrainState, name: str) -> None:
        pass

    def on_phase_end(self, state: TrainState, name: str, seconds: float) -> None:
        pass

    def on_train_begin(self, state: TrainState) -> None:
        pass

    def on_step_end(self, state: TrainState) -> None:
        pass

    def on_log(self, state: TrainState, row: dict[str, Any]) -> None:
        pass

    def on_save(self, state: TrainState, path: Path) -> None:
        pass

    def on_train_end(self, state: TrainState) -> None:
        pass


class CallbackList(Callback):
    """Calls each event on every callback in order."""

    def __init__(self, callbacks: Iterable[Callback] = ()):
        self.callbacks = list(callbacks)

    @contextlib.contextmanager
    def phase(self, state: TrainState, name: str) -> Iterator[None]:
        """A block that is phase `name` of the run: on_phase_start, the block, on_phase_end with its wall time."""
        self.on_phase_start(state, name)
        start = time.perf_counter()
        yield
        self.on_phase_end(state, name, time.perf_counter() - start)

    def on_phase_start(self, state: TrainState, name: str) -> None:
        for cb in self.callbacks:
            cb.on_phase_start(state, name)

    def on_phase_end(self, state: TrainState, name: str, seconds: float) -> None:
        for cb in self.callbacks:
            cb.on_phase_end(state, name, seconds)

    def on_train_begin(self, state: TrainState) -> None:
        for cb in self.callbacks:
            cb.on_train_begin(state)

    def on_step_end(self, state: TrainState) -> None:
        for cb in self.callbacks:
            cb.on_step_end(state)

    def on_log(self, state: TrainState, row: dict[str, Any]) -> None:
        for cb in self.callbacks:
            cb.on_log(state, row)

    def on_save(self, state: TrainState, path: Path) -> None:
        for cb in self.callbacks:
            cb.on_save(state, path)

    def on_train_end(self, state: TrainState) -> None:
        for cb in self.callbacks:
            cb.on_train_end(state)


def checked_callbacks(callbacks: Any) -> list[Callback]:
    """The callbacks a caller hands to train()/sft(): None or a list of Callback objects, else one sentence (before
    anything is loaded or written)."""
    if callbacks is None:
        return []
    if not (isinstance(callbacks, (list, tuple)) and all(isinstance(c, Callback) for c in callbacks)):
        raise PreftuneError(f"callbacks must be a list of preftune.callbacks.Callback objects, got {callbacks!r:.80}.")
    return list(callbacks)


class ProgressBar(Callback):
    """A tqdm bar over the optimizer steps, on the main process, with the last loss and accuracy."""

    def __init__(self) -> None:
        self.bar = None

    def on_train_begin(self, state: TrainState) -> None:
        from tqdm.auto import tqdm

        if state.is_main_process:
            self.bar = tqdm(total=state.total_steps, initial=state.step, desc=state.task, dynamic_ncols=True)

    def on_step_end(self, state: TrainState) -> None:
        if self.bar is not None:
            self.bar.update(state.step - self.bar.n)

    def on_log(self, state: TrainState, row: dict[str, Any]) -> None:
        if self.bar is not None and row.get("split") == "train":
            self.bar.set_postfix({k: f"{row[k]:.4g}" for k in ("loss", "rewards/accuracies")
                                  if isinstance(row.get(k), float)})

    def on_train_end(self, state: TrainState) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class ConsoleEval(Callback):
    """One line per evaluation, printed when it happens (the progress bar only shows training figures):

        eval @ step 20: loss 0.6123, rewards/accuracies 0.8125, rewards/margins 0.4512, kl 0.0213, ...
    """

    KEYS = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected", "kl")

    def __init__(self, printer: Callable[[str], None] = print):
        self.printer = printer

    def on_log(self, state: TrainState, row: dict[str, Any]) -> None:
        if row.get("split") != "eval" or not state.is_main_process:
            return
        keys = [k for k in self.KEYS if k in row] + [k for k in row if k not in self.KEYS and k not in ("step", "split")]
        parts = [f"{k} {row[k]:.4f}" if isinstance(row[k], float) else f"{k} {row[k]}" for k in keys]
        self.printer(f"eval @ step {row['step']}: " + ", ".join(parts))
