"""One config for every run: a dataclass, loadable from YAML, overridable by CLI flags named after its keys.

Each field's `help` is its one-line documentation; the CLI builds `--flag-name` options from them, so
the YAML keys, the Python keyword arguments and the flags are always the same names.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from preftune.config_checks import TEXT_FIELDS, annotation, check_ranges, check_types, need
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
                                     "(fields are dotted paths; an empty field drops the text before it).")
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
    cpo_alpha: float = _f(1.0, "Weight of CPO's NLL term on the chosen response (loss cpo).")
    discopop_tau: float = _f(0.05, "DiscoPOP's temperature tau (loss discopop).")
    f_divergence_type: str = _f("reverse_kl", "f-DPO divergence for the reward-gap losses: reverse_kl (DPO), forward_kl, js_divergence or alpha_divergence.")
    f_alpha_divergence_coef: float = _f(0.5, "alpha of f_divergence_type alpha_divergence, in (0, 1).")

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

    # --- speed (each exact; switch off to compare). `auto` = chosen per device by measurement (BENCHMARKS.md).
    prefix_sharing: Any = _f("auto", "How each prompt is shared by its two answers: auto, packed (one sequence prompt·chosen·rejected), cache (KV cache) or off (true = auto, false = off).")
    logits_chunk_size: Any = _f("auto", "Tokens per chunk of the vocab projection + log-softmax: auto, a number, or 0 for the model's own full logits.")
    group_by_length: bool = _f(True, "Batch pairs of similar length together to cut padding.")

    # --- evaluation, logging, saving
    eval_batch_size: int = _f(0, "Pairs per evaluation batch (0 = 2 x batch_size).")
    eval_steps: int = _f(0, "Evaluate every N optimizer steps (0 = only at the end).")
    logging_steps: int = _f(1, "Log metrics every N optimizer steps.")
    save_steps: int = _f(0, "Write a checkpoint every N optimizer steps (0 = only final/).")
    save_total_limit: int = _f(2, "Keep the last K checkpoints.")
    resume: Any = _f(None, "Resume from the latest checkpoint in output_dir (true), from a checkpoint path, or 'auto': resume if there is a checkpoint, else start afresh (for jobs a scheduler requeues).")
    resume_force: bool = _f(False, "Resume even if the checkpoint's model, data or math settings differ from this run's (each difference is printed).")
    overwrite: bool = _f(False, "Allow starting in an output_dir an earlier preftune run wrote (only the files it wrote are replaced).")
    progress: bool = _f(True, "Show a progress bar.")

    # --- tracking and publishing
    report_to: Any = _f([], "Experiment trackers to log to besides metrics.jsonl: tensorboard, wandb, mlflow (a list or comma-separated; none).")
    push_to_hub: str | None = _f(None, "Hub repository (user/name) to upload final/ and its model card to when training ends; a failed upload never fails the run.")
    hub_private: bool = _f(True, "Create the push_to_hub repository as private.")

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

    # The checks a user can get wrong; each raises one sentence saying what to do. Every field's type and range
    # is checked here, before anything is read or written.
    def validate(self) -> None:
        check_types(self)
        check_ranges(self)
        self._validate_speed()
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
        self.report_to = parse_report_to(self.report_to)
        need(self.push_to_hub is None or (isinstance(self.push_to_hub, str) and _REPO_ID.match(self.push_to_hub)
                                           and "--" not in self.push_to_hub and ".." not in self.push_to_hub),
              f"push_to_hub must be a Hub repository name like 'user/model-name', got {self.push_to_hub!r}.")
        # Building the loss config validates the loss names and their settings in one place.
        self.loss_config().check_reference(self.reference, self.reference_model)

    def _validate_speed(self) -> None:
        # Booleans are the keys' old values: true meant "share the prompt", which is now the device's best way.
        if isinstance(self.prefix_sharing, bool):
            self.prefix_sharing = "auto" if self.prefix_sharing else "off"
        if self.prefix_sharing not in ("auto", "packed", "cache", "off"):
            hint = difflib.get_close_matches(str(self.prefix_sharing), ("auto", "packed", "cache", "off"), n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise PreftuneError(f"prefix_sharing must be one of auto, packed, cache, off (or true/false); "
                                f"got {self.prefix_sharing!r}{extra}.")
        c = self.logits_chunk_size
        if isinstance(c, str) and c.strip().isdigit():
            c = self.logits_chunk_size = int(c)
        if not (c == "auto" or (isinstance(c, int) and not isinstance(c, bool) and c >= 0)):
            raise PreftuneError(f"logits_chunk_size must be auto or a whole number >= 0 (0 = full logits), got {c!r}.")

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
                          dpop_lambda=float(self.dpop_lambda), sft_weight=float(self.sft_weight),
                          cpo_alpha=float(self.cpo_alpha), discopop_tau=float(self.discopop_tau),
                          f_divergence_type=self.f_divergence_type,
                          f_alpha_divergence_coef=float(self.f_alpha_divergence_coef))

    def fit_to_context(self, limit: int | None) -> tuple[TrainConfig, str | None]:
        """This config with max_length capped at a model's `limit` positions (positions past it were never
        trained), and the line that says so; (self, None) when it fits."""
        if limit is None or self.max_length <= limit:
            return self, None
        prompt = self.max_prompt_length if self.max_prompt_length < limit else limit // 2
        note = f" and max_prompt_length {self.max_prompt_length} to {prompt}" if prompt != self.max_prompt_length else ""
        return (dataclasses.replace(self, max_length=limit, max_prompt_length=prompt),
                f"max_length {self.max_length} is more than the model's {limit} positions: capped it to {limit}{note}")

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


TRACKERS = ("tensorboard", "wandb", "mlflow")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?$")


def parse_report_to(value: Any) -> list[str]:
    """A report_to setting (a list, "a,b", "all", or "none"/None/[]) as a checked list of tracker names."""
    if value in (None, "", "none", "None", [], ()):
        return []
    if not isinstance(value, (str, list, tuple)):
        raise PreftuneError(f"report_to must be a list of tracker names, got {value!r}.")
    names = [str(n).strip().lower() for n in (value.split(",") if isinstance(value, str) else value) if str(n).strip()]
    if "all" in names:
        return list(TRACKERS)
    for n in names:
        if n not in TRACKERS:
            hint = difflib.get_close_matches(n, TRACKERS, n=1)
            raise PreftuneError(f"report_to names an unknown tracker {n!r}{f' (did you mean {hint[0]!r}?)' if hint else ''}; "
                                f"use any of {', '.join(TRACKERS)}, or none.")
    return list(dict.fromkeys(n for n in names if n != "none"))


def check_keys(values: dict[str, Any], where: str) -> None:
    """Refuse unknown keys, naming the nearest valid one (a typo must never be silently ignored)."""
    valid = TrainConfig.field_names()
    for key in values:
        if key not in valid:
            hint = difflib.get_close_matches(str(key).replace("-", "_"), valid, n=1, cutoff=0.5)
            extra = f"; did you mean {hint[0]!r}?" if hint else "; see `preftune train --help` for the valid keys."
            raise PreftuneError(f"unknown config key {key!r} in {where}{extra}")


# A config is a few dozen keys: these bounds are far above any real one and stop a YAML "billion laughs" (a few
# lines of nested aliases that expand to billions of values once anything copies or writes them).
MAX_YAML_BYTES = 1 << 20
MAX_YAML_VALUES = 100_000

_YAML_STR = "tag:yaml.org,2002:str"
_YAML_NULL = "tag:yaml.org,2002:null"
_YAML_BOOL = "tag:yaml.org,2002:bool"


def _expanded_size(node: yaml.Node, where: str) -> int:
    """How many values the document holds once every alias is expanded, without expanding it (memoised on the
    shared nodes); refuses past MAX_YAML_VALUES and self-referencing aliases."""
    sizes: dict[int, int] = {}
    busy: set[int] = set()

    def size(n: yaml.Node) -> int:
        if id(n) in sizes:
            return sizes[id(n)]
        if id(n) in busy:
            raise PreftuneError(f"{where} has an alias that contains itself; write the values out instead.")
        busy.add(id(n))
        if isinstance(n, yaml.SequenceNode):
            total = 1 + sum(size(c) for c in n.value)
        elif isinstance(n, yaml.MappingNode):
            total = 1 + sum(size(k) + size(v) for k, v in n.value)
        else:
            total = 1
        busy.discard(id(n))
        if total > MAX_YAML_VALUES:
            raise PreftuneError(f"{where} expands to more than {MAX_YAML_VALUES:,} values (YAML aliases repeating "
                                "aliases); a config needs a few dozen: write the values out instead.")
        sizes[id(n)] = total
        return total

    return size(node)


def _construct(loader: yaml.SafeLoader, node: yaml.Node, name: str | None) -> Any:
    """A node's value; for a text field a plain scalar stays the text as written (2024-06-01, 123, 1.0), except
    null and, for fields that also take booleans (resume), true/false."""
    if name is not None and is_text_field(name):
        if isinstance(node, yaml.ScalarNode) and node.style is None and node.tag != _YAML_STR:
            if node.tag == _YAML_NULL or (node.tag == _YAML_BOOL and _annotation(name) == "Any"):
                return loader.construct_object(node, deep=True)
            return node.value
        if isinstance(node, yaml.SequenceNode) and name in TEXT_FIELDS:
            return [_construct(loader, c, name) if isinstance(c, yaml.ScalarNode) else
                    loader.construct_object(c, deep=True) for c in node.value]
    return loader.construct_object(node, deep=True)


def parse_yaml(text: str, where: str, *, name: str | None = None, mapping: bool = False) -> Any:
    """YAML text → values, bounded in size and alias expansion. `mapping`: a config file (top-level keys are
    field names, each value read for its field); `name`: one field's value (a CLI flag)."""
    if len(text) > MAX_YAML_BYTES:
        raise PreftuneError(f"{where} is {len(text):,} characters long; a config is a few dozen keys "
                            f"(at most {MAX_YAML_BYTES:,} characters are read).")
    loader = None
    try:
        loader = yaml.SafeLoader(text)  # refuses control characters already here
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, where)
        if mapping and isinstance(node, yaml.MappingNode):
            loader.flatten_mapping(node)  # `<<: *defaults` merge keys, as yaml.safe_load reads them
            out = {}
            for k, v in node.value:
                key = loader.construct_object(k, deep=True)
                out[key] = _construct(loader, v, key if isinstance(key, str) and key in _FIELDS else None)
            return out
        return _construct(loader, node, name)
    except yaml.YAMLError as e:
        raise PreftuneError(f"{where} is not valid YAML ({str(e).splitlines()[0]}).") from None
    except (RecursionError, TypeError) as e:  # nesting deeper than the parser's stack; an unhashable key
        kind = "nested too deeply" if isinstance(e, RecursionError) else f"not a valid mapping ({e})"
        raise PreftuneError(f"{where} is {kind}; a config is a flat list of keys.") from None
    finally:
        if loader is not None:
            loader.dispose()


_FIELDS = frozenset(f.name for f in dataclasses.fields(TrainConfig))


def _annotation(name: str) -> str:
    return annotation(TrainConfig, name)


def is_text_field(name: str) -> bool:
    """Whether a field's value is text (a path, a name, a choice) that YAML must not reinterpret."""
    return name in TEXT_FIELDS or _annotation(name) in ("str", "str | None")


def flag_value(name: str, text: str) -> Any:
    """A CLI flag's value: text fields as typed (`--output-dir 2024-06-01`, `--model 123` stay text), others
    read as YAML so `--beta 0.1`, `--lora true`, `--loss [sigmoid, sft]` work; unreadable YAML stays text."""
    if _annotation(name) in ("str", "str | None"):
        return text
    try:
        return parse_yaml(text, f"--{name.replace('_', '-')}", name=name)
    except PreftuneError:
        if len(text) > MAX_YAML_BYTES:
            raise
        return text


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise PreftuneError(f"config file {p} does not exist; pass the path of a YAML file.")
    if p.stat().st_size > MAX_YAML_BYTES:
        raise PreftuneError(f"config file {p} is {p.stat().st_size:,} bytes; a config is a few dozen keys "
                            f"(at most {MAX_YAML_BYTES:,} bytes are read).")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise PreftuneError(f"config file {p} is not UTF-8 text.") from None
    values = parse_yaml(text, f"config file {p}", mapping=True)
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise PreftuneError(f"config file {p} must be a mapping of keys to values, got {type(values).__name__}.")
    return values
