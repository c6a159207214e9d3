"""Does a checkpoint belong to this run? Resume continues the math of the steps already taken, so the model, the
training data (as token ids), the task and every setting that changes the math must be the ones the checkpoint
was trained with. The launch shape may change as long as the global batch (per device × processes ×
accumulation, recorded under "launch") does not: it defines the steps and the batch order.

Each checkpoint records the run's identity (in trainer_state.json, under "identity"); `check_resume` compares it
with this run's and refuses naming every difference, unless --resume-force. The settings in MAY_CHANGE never
change what the steps already taken mean, and may differ freely: how long to train (max_steps, num_epochs: the
learning-rate schedule is stretched from the resumed step on), when to log, evaluate and save, what to evaluate
on, the progress bar, the paths of the model and data (their content is compared instead), safety switches and
the exact forward path (same math, other speed or memory).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from preftune.config import TrainConfig
from preftune.data.store import pairs_digest
from preftune.errors import PreftuneError
from preftune.modeling.reference import model_identity
from preftune.options import may_change

# The options declared with may_change=True (config.py says why each may); every other one must match.
MAY_CHANGE = may_change(TrainConfig)


def run_identity(config: dict[str, Any], task: str, model_path: str, pairs: Sequence) -> dict[str, Any]:
    """What a checkpoint of this run must match (plain JSON values), from the run's `config` (TrainConfig.to_dict:
    every option but those that MAY_CHANGE, and the reference model's identity)."""
    reference_model = config.get("reference_model")
    config = {k: v for k, v in config.items() if k not in MAY_CHANGE}
    return json.loads(json.dumps({
        "task": task, "model": model_identity(model_path),
        "reference_model": model_identity(reference_model) if reference_model else None,
        "data": {"pairs": len(pairs), "sha256": pairs_digest(pairs)},
        "config": config}, default=str))


def _model_change(name: str, old: str | None, new: str | None) -> str:
    try:
        a, b = json.loads(old or "{}"), json.loads(new or "{}")
    except ValueError:
        a = b = None
    if not isinstance(a, dict) or not isinstance(b, dict):
        return f"{name} {old} → {new}"
    changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return f"the {name} differs ({', '.join(changed[:4])}{' ...' if len(changed) > 4 else ''} changed)"


def differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Each way the saved run differs from this one, as a phrase."""
    out = []
    if saved.get("task") != current["task"]:
        out.append(f"it is a {saved.get('task')} run and this is a {current['task']} run")
    for name in ("model", "reference_model"):
        if saved.get(name) != current[name]:
            out.append(_model_change(name.replace("_", " "), saved.get(name), current[name]))
    if saved.get("data") != current["data"]:
        old, new = saved.get("data") or {}, current["data"]
        out.append(f"the training data differ as tokenized ({old.get('pairs')} pairs, sha256 "
                   f"{str(old.get('sha256'))[:12]} → {new['pairs']} pairs, sha256 {new['sha256'][:12]})")
    old_cfg, new_cfg = saved.get("config") or {}, current["config"]
    # Keys known to only one of the two versions of preftune are not compared.
    for key in sorted(set(old_cfg) & set(new_cfg)):
        if old_cfg[key] != new_cfg[key]:
            out.append(f"{key} {old_cfg[key]!r} → {new_cfg[key]!r}")
    return out


def global_batch_change(saved: dict[str, Any] | None, now: dict[str, Any] | None) -> str | None:
    """The phrase for a changed global batch between two launches (distributed.Engine.launch), else None."""
    if not saved or not now or saved.get("global_batch") == now.get("global_batch"):
        return None

    def shape(x: dict[str, Any]) -> str:
        return (f"{x.get('batch_size')} per device × {x.get('num_processes')} processes × "
                f"{x.get('gradient_accumulation_steps')} accumulation")

    return (f"the global batch {saved.get('global_batch')} ({shape(saved)}) → {now.get('global_batch')} "
            f"({shape(now)}): another launch shape may resume only with the same product")


def check_resume(checkpoint: Path, identity: dict[str, Any], *, force: bool, launch: dict[str, Any] | None = None,
                 say: Callable[[str], None] = print) -> None:
    """Refuse to resume `checkpoint` into a run it does not belong to (naming each difference, the global batch of
    `launch` included), unless `force`."""
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
        saved = state.get("identity")
    except (OSError, ValueError, AttributeError):
        state, saved = {}, None
    diffs = (differences(saved, identity) if isinstance(saved, dict)
             else ["it records no run identity (written by an older preftune)"])
    batch = global_batch_change(state.get("launch") if isinstance(state, dict) else None, launch)
    diffs += [batch] if batch else []
    if not diffs:
        return
    if force:
        say(f"--resume-force: resuming from {checkpoint.name} although {'; '.join(diffs)}")
        return
    raise PreftuneError(f"checkpoint {checkpoint} belongs to a different run: {'; '.join(diffs)}; resume with the "
                        "settings it was trained with, start a new run in another --output-dir, or pass "
                        "--resume-force to continue anyway (max_steps, num_epochs and the logging, evaluation and "
                        "saving settings may always change).")
