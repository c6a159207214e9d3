"""One config for every run: a dataclass, loadable from YAML, overridable by CLI flags named after its keys.

Each field's `help` is its one-line documentation; the CLI builds `--flag-name` options from them, so
the YAML keys, the Python keyword arguments and the flags are always the same names.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from preftune.errors import PreftuneError


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """Everything a `preftune train` (DPO family) or `preftune sft` run needs."""

    # --- what to train on
    model: str = _f("", "Model to fine-tune: a local Hugging Face folder or a hub name.")
    data: Any = _f("", "Training data: a file (JSONL, JSON array, CSV, Parquet), a glob, a list of files, or a save_to_disk folder.")
    output_dir: str = _f("", "Run folder: config.yaml, metrics.jsonl, checkpoints and final/ are written here.")
    eval_data: Any = _f(None, "Held-out data in the same format as `data` (optional).")
    eval_fraction: float = _f(0.0, "Share of `data` held out for evaluation when eval_data is not given (0 = none).")
    format: str = _f("auto", "Data format: auto, standard, conversational or implicit.")
    prompt_field: str = _f("prompt", "Column holding the prompt (dotted path for nested fields).")
    chosen_field: str = _f("chosen", "Column holding the preferred answer.")
    rejected_field: str = _f("rejected", "Column holding the dispreferred answer.")
    completion_field: str = _f("completion", "Column holding the answer for SFT data.")
    prompt_template: str | None = _f(None, "Build the prompt from several fields, e.g. '{system}\\n\\n{question}' "
                                     "(fields are dotted paths; an empty field drops the text before it).",
                                     text=True)
    skip_invalid: bool = _f(False, "Drop invalid rows (and report them) instead of stopping.")
    max_length: int = _f(1024, "Longest prompt+completion in tokens; completions are truncated from the right to fit.")
    max_prompt_length: int = _f(512, "Longest prompt in tokens; prompts are truncated from the left to fit.")
    data_cache_dir: str | None = _f(None, "Folder for tokenized data that runs share (default: the run folder's "
                                    "data_cache/, reused by reruns and resumes of that run).")

    # --- model
    dtype: str = _f("float32", "Weights dtype: float32, bfloat16 or float16.")
    attn_implementation: str | None = _f(None, "Attention implementation (eager, sdpa, flash_attention_2); default: transformers' choice.")
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward to save memory.")
    trust_remote_code: bool = _f(False, "Allow model code shipped inside the model folder to run. Only for folders you trust.")
    allow_pickle: bool = _f(False, "Allow loading .bin/.pt (pickle) weights; by default only safetensors load.")

    # --- reference model
    reference: str = _f("auto", "Reference strategy: auto, copy, lora_disabled, precomputed or none.")
    reference_model: str | None = _f(None, "A different model folder to use as the reference (default: the starting model).")

    # --- LoRA
    lora: bool = _f(False, "Train LoRA adapters instead of all weights.")
    lora_r: int = _f(16, "LoRA rank.")
    lora_alpha: int = _f(32, "LoRA scaling numerator (scale = alpha / r).")
    lora_dropout: float = _f(0.0, "Dropout on the LoRA branch.")
    lora_target_modules: Any = _f("all-linear", "Modules to adapt: 'all-linear' or a list of module names.")
    merge_lora: bool = _f(False, "Merge adapters into the base weights in final/ instead of saving adapters.")

    # --- loss
    loss: Any = _f("sigmoid", "Loss type, or several joined by '+' or given as a list (weighted by loss_weights).")
    loss_weights: Any = _f(None, "Weights of the combined losses (same length as loss).")
    beta: float = _f(0.1, "Strength of the KL anchor to the reference: larger keeps the policy closer to it (0.1 is usual).")
    label_smoothing: float = _f(0.0, "Assumed share of flipped labels (conservative DPO / rDPO), in [0, 0.5).")
    simpo_gamma: float = _f(0.5, "SimPO target reward margin gamma.")
    dpop_lambda: float = _f(50.0, "DPO-Positive penalty weight lambda.")
    sft_weight: float = _f(0.0, "Weight of an added NLL term on the chosen response (RPO alpha).")

    # --- optimisation
    learning_rate: float = _f(1e-6, "Peak learning rate of AdamW.")
    lr_scheduler: str = _f("cosine", "Schedule after warmup: cosine, linear or constant.")
    warmup_steps: int = _f(0, "Warmup steps (overrides warmup_ratio when > 0).")
    warmup_ratio: float = _f(0.1, "Warmup as a share of the optimizer steps.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    adam_beta1: float = _f(0.9, "AdamW beta1.")
    adam_beta2: float = _f(0.999, "AdamW beta2.")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon.")
    max_grad_norm: float = _f(1.0, "Clip gradients to this global norm (0 = no clipping).")
    batch_size: int = _f(8, "Pairs per micro-batch per device.")
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimizer step.")
    num_epochs: float = _f(1.0, "Passes over the training data (ignored when max_steps > 0).")
    max_steps: int = _f(0, "Optimizer steps to run (0 = derive from num_epochs).")
    mixed_precision: str = _f("no", "Autocast: no, bf16 or fp16 (weights stay in their dtype).")
    on_nonfinite: str = _f("stop", "A NaN/infinite loss or gradient: stop (naming the step and examples) or skip the step.")
    seed: int = _f(42, "Seed for data order, initialisation and dropout.")
    disable_dropout: bool = _f(True, "Turn dropout off in policy and reference (DPO's log-ratios assume it).")

    # --- speed (each exact; switch off to compare)
    prefix_sharing: bool = _f(True, "Run each pair's prompt through the model once for both answers.")
    logits_chunk_size: int = _f(1024, "Tokens per chunk of the vocab projection + log-softmax (0 = whole batch at once).")
    group_by_length: bool = _f(True, "Batch pairs of similar length together to cut padding.")

    # --- evaluation, logging, saving
    eval_batch_size: int = _f(0, "Pairs per evaluation batch (0 = 2 x batch_size).")
    eval_steps: int = _f(0, "Evaluate every N optimizer steps (0 = only at the end).")
    logging_steps: int = _f(1, "Log metrics every N optimizer steps.")
    save_steps: int = _f(0, "Write a checkpoint every N optimizer steps (0 = only final/).")
    save_total_limit: int = _f(2, "Keep the last K checkpoints.")
    resume: Any = _f(None, "Resume from the latest checkpoint in output_dir (true) or from a checkpoint path.")
    overwrite: bool = _f(False, "Allow starting in a non-empty output_dir (its run files are replaced).")
    progress: bool = _f(True, "Show a progress bar.")

    def __post_init__(self) -> None:
        self._coerce_numbers()
        self.validate()

    def _coerce_numbers(self) -> None:
        # YAML 1.1 reads `1e-6` (no dot) as a string; accept it as the number everybody means.
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, str) and type(f.default) in (int, float) and not isinstance(f.default, bool):
                try:
                    num = float(v)
                except ValueError:
                    continue
                if isinstance(f.default, int) and num.is_integer():
                    num = int(num)
                setattr(self, f.name, num)

    # The checks a user can get wrong; each raises one sentence saying what to do.
    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise PreftuneError(msg)

        for name in ("beta", "learning_rate", "label_smoothing", "eval_fraction", "max_grad_norm", "warmup_ratio",
                     "weight_decay", "num_epochs", "simpo_gamma", "dpop_lambda", "sft_weight", "lora_dropout"):
            v = getattr(self, name)
            need(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
                 f"{name} must be a finite number, got {v!r}.")
        for name in ("max_length", "max_prompt_length", "batch_size", "gradient_accumulation_steps", "max_steps",
                     "warmup_steps", "eval_batch_size", "eval_steps", "logging_steps", "save_steps", "save_total_limit",
                     "lora_r", "lora_alpha", "seed", "logits_chunk_size"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool), f"{name} must be a whole number, got {v!r}.")
        need(self.beta > 0, f"beta must be > 0 (got {self.beta}); it is the strength of the KL anchor to the "
             "reference, larger keeps the policy closer to it, and 0.1 is the usual default.")
        need(0 <= self.label_smoothing < 0.5, f"label_smoothing must be in [0, 0.5) (got {self.label_smoothing}).")
        need(self.learning_rate > 0, f"learning_rate must be > 0 (got {self.learning_rate}).")
        need(self.batch_size >= 1, f"batch_size must be at least 1 (got {self.batch_size}).")
        need(self.gradient_accumulation_steps >= 1,
             f"gradient_accumulation_steps must be at least 1 (got {self.gradient_accumulation_steps}).")
        need(self.max_steps >= 0, f"max_steps must be >= 0 (got {self.max_steps}).")
        need(self.num_epochs > 0, f"num_epochs must be > 0 (got {self.num_epochs}).")
        need(0 <= self.eval_fraction < 1, f"eval_fraction must be in [0, 1) (got {self.eval_fraction}).")
        need(0 <= self.warmup_ratio < 1, f"warmup_ratio must be in [0, 1) (got {self.warmup_ratio}).")
        need(self.max_prompt_length >= 1 and self.max_length >= 2,
             f"max_length ({self.max_length}) and max_prompt_length ({self.max_prompt_length}) must be positive.")
        need(self.max_prompt_length < self.max_length,
             f"max_prompt_length ({self.max_prompt_length}) must be smaller than max_length ({self.max_length}) "
             "so that some completion tokens fit.")
        need(self.logging_steps >= 1, f"logging_steps must be at least 1 (got {self.logging_steps}).")
        need(self.max_grad_norm >= 0, f"max_grad_norm must be >= 0 (got {self.max_grad_norm}).")
        need(self.lora_r >= 1, f"lora_r must be at least 1 (got {self.lora_r}).")
        for name, allowed in (("dtype", ("float32", "bfloat16", "float16")),
                              ("mixed_precision", ("no", "bf16", "fp16")),
                              ("on_nonfinite", ("stop", "skip")),
                              ("lr_scheduler", ("cosine", "linear", "constant")),
                              ("reference", ("auto", "copy", "lora_disabled", "precomputed", "none")),
                              ("format", ("auto", "standard", "conversational", "implicit"))):
            v = getattr(self, name)
            if v not in allowed:
                hint = difflib.get_close_matches(str(v), allowed, n=1)
                extra = f" (did you mean {hint[0]!r}?)" if hint else ""
                raise PreftuneError(f"{name} must be one of {', '.join(allowed)}; got {v!r}{extra}.")
        if self.prompt_template is not None:
            from preftune.data.layouts import PromptTemplate  # the data layer owns the template syntax

            PromptTemplate.parse(self.prompt_template)
        need(not (self.reference == "lora_disabled" and not self.lora),
             "reference 'lora_disabled' needs lora: true (it reuses the base weights under the adapters).")
        # Building the loss config validates the loss names and their settings in one place.
        self.loss_config()

    def loss_types(self) -> tuple[str, ...]:
        if isinstance(self.loss, str):
            return tuple(p.strip() for p in self.loss.replace(",", "+").split("+") if p.strip())
        return tuple(str(p) for p in self.loss)

    def loss_config(self):  # -> preftune.losses.LossConfig (imported lazily: losses imports torch)
        from preftune.losses import LossConfig

        weights = None
        if self.loss_weights is not None:
            raw = self.loss_weights
            if isinstance(raw, str):
                raw = [w for w in raw.replace("+", ",").split(",") if w.strip()]
            try:
                weights = tuple(float(w) for w in raw)
            except (TypeError, ValueError):
                raise PreftuneError(f"loss_weights must be a list of numbers, got {self.loss_weights!r}.") from None
        return LossConfig(loss_types=self.loss_types(), loss_weights=weights, beta=float(self.beta),
                          label_smoothing=float(self.label_smoothing), simpo_gamma=float(self.simpo_gamma),
                          dpop_lambda=float(self.dpop_lambda), sft_weight=float(self.sft_weight))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "config") -> TrainConfig:
        check_keys(values, where)
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
        values = read_yaml(path)
        values.update(overrides or {})
        return cls.from_dict(values, where=str(path))


def check_keys(values: dict[str, Any], where: str) -> None:
    """Refuse unknown keys, naming the nearest valid one (a typo must never be silently ignored)."""
    valid = TrainConfig.field_names()
    for key in values:
        if key not in valid:
            hint = difflib.get_close_matches(str(key).replace("-", "_"), valid, n=1, cutoff=0.5)
            extra = f"; did you mean {hint[0]!r}?" if hint else "; see `preftune train --help` for the valid keys."
            raise PreftuneError(f"unknown config key {key!r} in {where}{extra}")


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise PreftuneError(f"config file {p} does not exist; pass the path of a YAML file.")
    try:
        values = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise PreftuneError(f"config file {p} is not valid YAML ({str(e).splitlines()[0]}).") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise PreftuneError(f"config file {p} must be a mapping of keys to values, got {type(values).__name__}.")
    return values
