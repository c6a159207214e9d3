"""Experiment trackers (`report_to: [tensorboard, wandb, mlflow]`) through accelerate's tracker classes, and
the console line for each evaluation.

metrics.jsonl stays the source of truth (full precision, every row); trackers get the same rows, keyed
"train/loss", "eval/rewards/accuracies", ..., at the row's optimizer step. Every tracker works offline and
writes inside the run folder unless its own environment variables say otherwise:

- tensorboard: event files in RUN/tensorboard/ (`tensorboard --logdir RUN/tensorboard`);
- wandb: offline mode unless WANDB_MODE is set or an API key is configured (WANDB_API_KEY); the run folder
  is RUN/wandb/offline-run-*/ (upload later with `wandb sync`); project WANDB_PROJECT or "preftune";
- mlflow: MLFLOW_TRACKING_URI when set, else MLflow's local file store in RUN/mlruns (which MLflow 3 keeps
  in maintenance mode behind MLFLOW_ALLOW_FILE_STORE, set here for that store only when unset); experiment
  MLFLOW_EXPERIMENT_NAME or "preftune". `mlflow ui --backend-store-uri RUN/mlruns` needs the full mlflow.

Install with the extras: `pip install 'preftune[tensorboard]'`, `[wandb]`, `[mlflow]` (or `[trackers]`).

    from preftune.outputs.trackers import TrackerCallback, ConsoleEvalCallback
    train(cfg, callbacks=[TrackerCallback(["tensorboard"]), ConsoleEvalCallback()])
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from preftune.callbacks import Callback
from preftune.config import TRACKERS, parse_report_to
from preftune.errors import PreftuneError

__all__ = ["TRACKERS", "TrackerCallback", "make_trackers", "parse_report_to"]
# The import name that makes each tracker work, and the extra that installs it.
_PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow")}


def check_installed(names: Sequence[str]) -> None:
    """One sentence naming the missing package and the extra to install, before any training starts."""
    for n in names:
        module, extra = _PACKAGES[n]
        if importlib.util.find_spec(module) is None:
            raise PreftuneError(f"report_to includes {n} but the {module} package is not installed; "
                                f"pip install 'preftune[{extra}]' or remove {n} from report_to.")


def flat_config(config: Any) -> dict[str, Any]:
    """The config as trackers accept it: scalars kept, anything else (None, lists) as its string."""
    values = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in values.items()}


def tracker_values(row: dict[str, Any]) -> dict[str, float]:
    """A metrics row as tracker values: numbers only (a non-finite value is logged as null in metrics.jsonl
    and left out here), each key prefixed with the row's split."""
    split = row.get("split", "train")
    return {f"{split}/{k}": v for k, v in row.items()
            if k not in ("step", "split") and isinstance(v, (int, float)) and not isinstance(v, bool)}


def make_trackers(names: Sequence[str], run_dir: Path, run_name: str) -> list:
    """accelerate tracker objects for `names`, started, writing under `run_dir` (see the module docstring)."""
    from accelerate.state import PartialState
    from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker

    check_installed(names)
    PartialState()  # accelerate's trackers log through its logger, which needs the state (the recipe made it)
    trackers = []
    for n in names:
        if n == "tensorboard":
            t = TensorBoardTracker(run_name, run_dir / "tensorboard")
        elif n == "wandb":
            mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
            t = WandBTracker(os.environ.get("WANDB_PROJECT", "preftune"), name=run_name, dir=str(run_dir),
                             mode=mode)
        else:
            import mlflow

            if not os.environ.get("MLFLOW_TRACKING_URI"):
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
                mlflow.set_tracking_uri((run_dir / "mlruns").resolve().as_uri())
            t = MLflowTracker(experiment_name=os.environ.get("MLFLOW_EXPERIMENT_NAME", "preftune"),
                              run_name=run_name)
        t.start()
        trackers.append(t)
    return trackers


class TrackerCallback(Callback):
    """Training callback: on_train_begin starts the trackers and stores the config, on_log logs each
    metrics row at its step, on_train_end closes them. Main process only.

    `report_to`: tracker names (see `parse_report_to`); `run_name`: default the run folder's name.
    """

    def __init__(self, report_to: Any, run_name: str | None = None):
        self.names = parse_report_to(report_to)
        check_installed(self.names)  # at construction: a missing package stops the run before any model loads
        self.run_name = run_name
        self.trackers: list = []

    def on_train_begin(self, state) -> None:
        if not state.is_main_process or not self.names:
            return
        run_dir = Path(state.output_dir)
        self.trackers = make_trackers(self.names, run_dir, self.run_name or run_dir.resolve().name)
        values = flat_config(state.config)
        values["task"] = state.task
        for t in self.trackers:
            t.store_init_configuration(values)

    def on_log(self, state, row: dict) -> None:
        values = tracker_values(row)
        for t in self.trackers:
            t.log(values, step=int(row["step"]))

    def on_train_end(self, state) -> None:
        for t in self.trackers:
            t.finish()
        self.trackers = []
