"""The type and range checks of every TrainConfig field (config.py calls them from `TrainConfig.validate`).

They read the fields from the instance they are given, so this module needs nothing from config.py.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

from preftune.errors import PreftuneError


def need(cond: bool, msg: str) -> None:
    if not cond:
        raise PreftuneError(msg)


# Values that name files, models or losses: YAML must not turn `output_dir: 2024-06-01` into a date or
# `--model 123` into a number (the str fields are found from their annotation; these are typed Any because
# they also take lists or booleans).
TEXT_FIELDS = ("data", "eval_data", "resume", "loss", "lora_target_modules")
PATH_FIELDS = ("model", "output_dir", "reference_model", "data", "eval_data", "resume")
MAX_INT = 2**31 - 1  # counts past this are typos, and overflow int32 tensors and progress bars
MAX_SEED = 2**32 - 1  # numpy's seed range


def annotation(cfg_class: Any, name: str) -> str:
    """The type annotation of a config field, as written (`from __future__ import annotations`: a string)."""
    return str(next(f.type for f in dataclasses.fields(cfg_class) if f.name == name))


def _is_path_list(v: Any, allow_empty: bool = False) -> bool:
    if isinstance(v, (str, os.PathLike)):
        return True
    return isinstance(v, (list, tuple)) and (allow_empty or len(v) > 0) and all(
        isinstance(x, (str, os.PathLike)) for x in v)


def _plain(v: Any) -> Any:
    """Path objects → str (config.yaml and the resume check store plain values)."""
    if isinstance(v, os.PathLike):
        return os.fspath(v)
    if isinstance(v, tuple) or (isinstance(v, list) and any(isinstance(x, os.PathLike) for x in v)):
        return [os.fspath(x) if isinstance(x, os.PathLike) else x for x in v]
    return v


def check_types(cfg: Any) -> None:
    """Every field's value has the type its annotation says (paths as plain strings), else one sentence."""
    for f in dataclasses.fields(cfg):
        name, v, kind = f.name, getattr(cfg, f.name), str(f.type)
        if name in PATH_FIELDS:
            v = _plain(v)
            setattr(cfg, name, v)
        for text in (v if isinstance(v, list) else [v]):
            need(not (isinstance(text, str) and "\x00" in text), f"{name} contains a NUL character; remove it.")
        if kind == "bool":
            need(isinstance(v, bool), f"{name} must be true or false, got {v!r}.")
        elif kind in ("str", "str | None"):
            need(isinstance(v, str) or (v is None and kind == "str | None"),
                  f"{name} must be text, got {type(v).__name__} {v!r}.")
        elif kind == "float":
            need(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
                  f"{name} must be a finite number, got {v!r}.")
        elif kind == "int":
            need(isinstance(v, int) and not isinstance(v, bool), f"{name} must be a whole number, got {v!r}.")
            need(v <= (MAX_SEED if name == "seed" else MAX_INT),
                  f"{name} must be at most {MAX_SEED if name == 'seed' else MAX_INT}, got {v}.")
    need(_is_path_list(cfg.data, allow_empty=True), f"data must be a path or a list of paths, got {cfg.data!r}.")
    need(cfg.eval_data is None or _is_path_list(cfg.eval_data),
          f"eval_data must be a path or a list of paths, got {cfg.eval_data!r}.")
    need(cfg.resume is None or isinstance(cfg.resume, (bool, str)),
          f"resume must be true, false or a checkpoint path, got {cfg.resume!r}.")
    for name in ("loss", "lora_target_modules"):
        v = getattr(cfg, name)
        need(isinstance(v, str) or (isinstance(v, (list, tuple)) and len(v) > 0 and all(isinstance(x, str) for x in v)),
              f"{name} must be a name or a list of names, got {v!r}.")
    w = cfg.loss_weights
    need(w is None or isinstance(w, str) or (isinstance(w, (list, tuple)) and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) for x in w)),
          f"loss_weights must be a list of numbers, got {w!r}.")


# name: (lowest, lowest allowed?, highest, highest allowed?); None = no bound on that side.
RANGES: dict[str, tuple[float | None, bool, float | None, bool]] = {
    "learning_rate": (0, False, None, False), "label_smoothing": (0, True, 0.5, False),
    "eval_fraction": (0, True, 1, False), "warmup_ratio": (0, True, 1, False), "max_grad_norm": (0, True, None, False),
    "weight_decay": (0, True, None, False), "num_epochs": (0, False, 1e6, True), "simpo_gamma": (0, True, None, False),
    "dpop_lambda": (0, True, None, False), "sft_weight": (0, True, None, False), "lora_dropout": (0, True, 1, False),
    "adam_beta1": (0, True, 1, False), "adam_beta2": (0, True, 1, False), "adam_epsilon": (0, False, None, False),
    "batch_size": (1, True, None, False), "gradient_accumulation_steps": (1, True, None, False),
    "logging_steps": (1, True, None, False), "lora_r": (1, True, None, False), "lora_alpha": (1, True, None, False),
    "max_steps": (0, True, None, False), "warmup_steps": (0, True, None, False),
    "eval_batch_size": (0, True, None, False), "eval_steps": (0, True, None, False),
    "save_steps": (0, True, None, False), "save_total_limit": (0, True, None, False),
    "seed": (0, True, None, False),
    "cpo_alpha": (0, True, None, False), "discopop_tau": (0, False, None, False),
    "f_alpha_divergence_coef": (0, False, 1, False),
}


def _range_text(low: float | None, low_in: bool, high: float | None, high_in: bool, integer: bool) -> str:
    if high is None:
        return f"at least {low}" if integer and low_in else f"{'>=' if low_in else '>'} {low}"
    return f"in {'[' if low_in else '('}{low}, {high:g}{']' if high_in else ')'}"


def check_ranges(cfg: Any) -> None:
    """Every number within the range that makes sense for it (RANGES), else one sentence."""
    need(cfg.beta > 0, f"beta must be > 0 (got {cfg.beta}); it is the strength of the KL anchor to the "
          "reference, larger keeps the policy closer to it, and 0.1 is the usual default.")
    for name, (low, low_in, high, high_in) in RANGES.items():
        v = getattr(cfg, name)
        ok = (low is None or (v >= low if low_in else v > low)) and (high is None or (v <= high if high_in else v < high))
        integer = annotation(type(cfg), name) == "int"
        need(ok, f"{name} must be {_range_text(low, low_in, high, high_in, integer)} (got {v}).")
    need(cfg.max_prompt_length >= 1 and cfg.max_length >= 2,
          f"max_length ({cfg.max_length}) and max_prompt_length ({cfg.max_prompt_length}) must be positive.")
    need(cfg.max_prompt_length < cfg.max_length,
          f"max_prompt_length ({cfg.max_prompt_length}) must be smaller than max_length ({cfg.max_length}) "
          "so that some completion tokens fit.")
