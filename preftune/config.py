"""One config for every run: a dataclass, loadable from YAML, overridable by CLI flags named after its keys.

Each field is one option of the schema (preftune/options.py): its default, help, type, choices or range, and
whether a resume may change it are declared here once; the checks, the `--flag-name` options and `--help`, and
the resume check read them, so the YAML keys, the Python keyword arguments and the flags are always the same names.
The loss hyper-parameters (beta, label_smoothing, ...) are declared in options.LOSS_OPTIONS and added after
`loss_weights`.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from preftune.errors import PreftuneError
from preftune.options import (
    BATCH_SIZE,
    CHOSEN_FIELD,
    DTYPE,
    FORMAT,
    LORA,
    LORA_R,
    LOSS_OPTIONS,
    MAX_LENGTH,
    MAX_PROMPT_LENGTH,
    MIXED_PRECISIONS,
    MODEL,
    ONLINE_OPTIONS,
    PROMPT_FIELD,
    PROMPT_TEMPLATE,
    RANKED,
    REJECTED_FIELD,
    SEED,
    SPLIT,
    TEXT_TYPES,
    check_keys,
    include_options,
    names,
    need,
    online_rules,
    option,
    option_named,
    paths,
    validate,
)
from preftune.options import is_text as _is_text

_f = option  # the field list below is long: one short name for "an option of this command"


def _prompt_template(name: str, v: Any) -> Any:
    if v is not None and isinstance(v, str):
        # The data layer owns the template syntax; imported here, not at the top, because it brings in the data
        # package (7 modules, ~25 ms) that `preftune --help` does not need.
        from preftune.data.layouts import PromptTemplate

        PromptTemplate.parse(v)
    return v


def _resume(name: str, v: Any) -> Any:
    """true/false however written (YAML, a flag, Python; "latest" is true), "auto", or a checkpoint path: the one
    place resume's spellings are read (RunDir.finished and pick_checkpoint take these values)."""
    need(v is None or isinstance(v, (bool, str)), f"resume must be true, false or a checkpoint path, got {v!r}.")
    return {"true": True, "True": True, "latest": True, "false": False, "False": False, "": False}.get(v, v) \
        if isinstance(v, str) else v


def _prefix_sharing(name: str, v: Any) -> Any:
    # Booleans are the key's old values: true meant "share the prompt", which is now the device's best way.
    return ("auto" if v else "off") if isinstance(v, bool) else v


def _chunk_size(name: str, v: Any) -> Any:
    if isinstance(v, str) and v.strip().isdigit():
        v = int(v)
    need(v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 0),
         f"logits_chunk_size must be auto or a whole number >= 0 (0 = full logits), got {v!r}.")
    return v


def _numbers(name: str, v: Any) -> Any:
    need(v is None or isinstance(v, str) or (isinstance(v, (list, tuple)) and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)),
         f"loss_weights must be a list of numbers, got {v!r}.")
    return v


def _report_to(name: str, v: Any) -> Any:
    return parse_report_to(v)


def _repo_id(name: str, v: Any) -> Any:
    need(v is None or (isinstance(v, str) and _REPO_ID.match(v) and "--" not in v and ".." not in v),
         f"push_to_hub must be a Hub repository name like 'user/model-name', got {v!r}.")
    return v


@dataclass
@include_options(LOSS_OPTIONS, after="loss_weights")
@include_options(ONLINE_OPTIONS, after="data_cache_dir")  # online DPO's: options.ONLINE_OPTIONS
class TrainConfig:
    """Everything a `preftune train` (DPO family) or `preftune sft` run needs."""

    # --- what to train on
    model: str = MODEL.field()
    data: Any = _f("", "Training data: a file (JSONL, JSON array, CSV, Parquet), a glob, a list of files, or a save_to_disk folder.",
                   text=True, path=True, check=paths(allow_empty=True), may_change=True)
    output_dir: str = _f("", "Run folder: config.yaml, metrics.jsonl, checkpoints and final/ are written here.",
                         path=True, may_change=True)
    eval_data: Any = _f(None, "Held-out data in the same format as `data` (optional).", text=True, path=True,
                        check=paths(allow_empty=False), may_change=True)
    eval_fraction: float = _f(0.0, "Share of `data` held out for evaluation when eval_data is not given (0 = none).",
                              range="[0, 1)")
    split: str | None = SPLIT.field(help="Split of a saved DatasetDict folder or hub dataset to train on (default: "
                                    "'train', or its only split).")
    # what to evaluate on, like eval_data
    eval_split: str | None = _f(None, "Split to evaluate on, of eval_data or else of data (e.g. test_prefs); instead of "
                                "eval_fraction.", may_change=True)
    ranked: str = RANKED.field()
    format: str = FORMAT.field()
    prompt_field: str = PROMPT_FIELD.field()
    chosen_field: str = CHOSEN_FIELD.field()
    rejected_field: str = REJECTED_FIELD.field()
    completion_field: str = _f("completion", "Column holding the answer for SFT data.")
    prompt_template: str | None = PROMPT_TEMPLATE.field(check=_prompt_template)
    skip_invalid: bool = _f(False, "Drop invalid rows (and report them) instead of stopping.", may_change=True)
    max_length: int = MAX_LENGTH.field()
    max_prompt_length: int = MAX_PROMPT_LENGTH.field()
    data_cache_dir: str | None = _f(None, "Folder for tokenized data that runs share (default: the run folder's "
                                    "data_cache/, reused by reruns and resumes of that run).", path=True,
                                    may_change=True)  # where it is kept; the data itself is compared by token ids

    # --- model
    dtype: str = DTYPE.field()
    attn_implementation: str | None = _f(None, "Attention implementation (eager, sdpa, flash_attention_2); default: transformers' choice.",
                                         may_change=True)
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward to save memory.", may_change=True)
    trust_remote_code: bool = _f(False, "Allow model code shipped inside the model folder to run. Only for folders you trust.",
                                 may_change=True)
    allow_pickle: bool = _f(False, "Allow loading .bin/.pt (pickle) weights; by default only safetensors load.",
                            may_change=True)

    # --- reference model
    reference: str = _f("auto", "Reference strategy: auto, copy, lora_disabled, precomputed or none.",
                        choices=("auto", "copy", "lora_disabled", "precomputed", "none"))
    reference_model: str | None = _f(None, "A different model folder to use as the reference (default: the starting model).",
                                     path=True, may_change=True)

    # --- LoRA
    lora: bool = LORA.field()
    lora_r: int = LORA_R.field()
    lora_alpha: int = _f(32, "LoRA scaling numerator (scale = alpha / r).", range="[1, inf)")
    lora_dropout: float = _f(0.0, "Dropout on the LoRA branch.", range="[0, 1)")
    lora_target_modules: Any = _f("all-linear", "Modules to adapt: 'all-linear' or a list of module names.",
                                  text=True, check=names)
    merge_lora: bool = _f(False, "Merge adapters into the base weights in final/ instead of saving adapters.",
                          may_change=True)

    # --- loss (its hyper-parameters follow loss_weights: options.LOSS_OPTIONS)
    loss: Any = _f("sigmoid", "Loss type, or several joined by '+' or given as a list (weighted by loss_weights).",
                   text=True, check=names)
    loss_weights: Any = _f(None, "Weights of the combined losses (same length as loss).", check=_numbers)

    # --- optimisation
    learning_rate: float = _f(1e-6, "Peak learning rate of AdamW.", range="(0, inf)")
    lr_scheduler: str = _f("cosine", "Schedule after warmup: cosine, linear or constant.",
                           choices=("cosine", "linear", "constant"))
    warmup_steps: int = _f(0, "Warmup steps (overrides warmup_ratio when > 0).", range="[0, inf)")
    warmup_ratio: float = _f(0.1, "Warmup as a share of the optimizer steps.", range="[0, 1)")
    weight_decay: float = _f(0.0, "AdamW weight decay.", range="[0, inf)")
    adam_beta1: float = _f(0.9, "AdamW beta1.", range="[0, 1)")
    adam_beta2: float = _f(0.999, "AdamW beta2.", range="[0, 1)")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon.", range="(0, inf)")
    max_grad_norm: float = _f(1.0, "Clip gradients to this global norm (0 = no clipping).", range="[0, inf)")
    # The global batch (per device × processes × accumulation) is what defines the steps; the resume check
    # compares it, so its factors may change with the launch shape.
    batch_size: int = BATCH_SIZE.field()
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimizer step.", range="[1, inf)", may_change=True)
    # How long to train: the learning-rate schedule is stretched from the resumed step on.
    num_epochs: float = _f(1.0, "Passes over the training data (ignored when max_steps > 0).", range="(0, 1e6]",
                           may_change=True)
    max_steps: int = _f(0, "Optimizer steps to run (0 = derive from num_epochs).", range="[0, inf)", may_change=True)
    mixed_precision: str = _f("no", "Autocast: no, bf16 or fp16 (weights stay in their dtype).",
                              choices=MIXED_PRECISIONS)
    on_nonfinite: str = _f("stop", "A NaN/infinite loss or gradient: stop (naming the step and examples) or skip the step.",
                           choices=("stop", "skip"), may_change=True)
    seed: int = SEED.field()
    disable_dropout: bool = _f(True, "Turn dropout off in policy and reference (DPO's log-ratios assume it).")

    # --- speed (each exact; switch off to compare). `auto` = chosen per device by measurement (BENCHMARKS.md).
    # The forward path is the same math at another speed or memory: a resume may change it.
    prefix_sharing: Any = _f("auto", "How each prompt is shared by its two answers: auto, packed (one sequence prompt·chosen·rejected), cache (KV cache) or off (true = auto, false = off).",
                             choices=("auto", "packed", "cache", "off"), check=_prefix_sharing, may_change=True)
    logits_chunk_size: Any = _f("auto", "Tokens per chunk of the vocab projection + log-softmax: auto, a number, or 0 for the model's own full logits.",
                                check=_chunk_size, may_change=True)
    group_by_length: bool = _f(True, "Batch pairs of similar length together to cut padding.")

    # --- evaluation, logging, saving (when and what never changes the steps: a resume may change them)
    eval_batch_size: int = _f(0, "Pairs per evaluation batch (0 = 2 x batch_size).", range="[0, inf)", may_change=True)
    eval_steps: int = _f(0, "Evaluate every N optimizer steps (0 = only at the end).", range="[0, inf)", may_change=True)
    logging_steps: int = _f(1, "Log metrics every N optimizer steps.", range="[1, inf)", may_change=True)
    save_steps: int = _f(0, "Write a checkpoint every N optimizer steps (0 = only final/).", range="[0, inf)",
                         may_change=True)
    save_total_limit: int = _f(2, "Keep the last K checkpoints.", range="[0, inf)", may_change=True)
    resume: Any = _f(None, "Resume from the latest checkpoint in output_dir (true), from a checkpoint path, or 'auto': resume if there is a checkpoint, else start afresh (for jobs a scheduler requeues).",
                     text=True, path=True, check=_resume, may_change=True, flag={"const": True})
    resume_force: bool = _f(False, "Resume even if the checkpoint's model, data or math settings differ from this run's (each difference is printed).",
                            may_change=True)
    overwrite: bool = _f(False, "Allow starting in an output_dir an earlier preftune run wrote (only the files it wrote are replaced).",
                         may_change=True)
    progress: bool = _f(True, "Show a progress bar.", may_change=True)

    # --- tracking and publishing: what happens to the results, not how they are computed
    report_to: Any = _f([], "Experiment trackers to log to besides metrics.jsonl: tensorboard, wandb, mlflow (a list or comma-separated; none).",
                        check=_report_to, may_change=True)
    push_to_hub: str | None = _f(None, "Hub repository (user/name) to upload final/ and its model card to when training ends; a failed upload never fails the run.",
                                 check=_repo_id, may_change=True)
    hub_private: bool = _f(True, "Create the push_to_hub repository as private.", may_change=True)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Every option's type and range (the schema), then the rules between options; each refusal is one
        sentence saying what to do, raised before anything is read or written."""
        validate(self)
        need(self.max_prompt_length < self.max_length,
             f"max_prompt_length ({self.max_prompt_length}) must be smaller than max_length ({self.max_length}) "
             "so that some completion tokens fit.")
        need(not (self.eval_split and self.eval_fraction > 0),
             "eval_split and eval_fraction both choose the eval data; give one of them.")
        need(not (self.reference == "lora_disabled" and not self.lora),
             "reference 'lora_disabled' needs lora: true (it reuses the base weights under the adapters).")
        if self.online:
            online_rules(self)
        else:
            need(self.prompts is None and self.judge is None and self.judge_url is None,
                 "--prompts and --judge are for online DPO; add --online, or train on pairs with --data.")
        # Building the loss config checks the loss names, their weights and which settings they use.
        self.loss_config().check_reference(self.reference, self.reference_model, lora=self.lora)

    def loss_types(self) -> tuple[str, ...]:
        if isinstance(self.loss, str):
            return tuple(p.strip() for p in self.loss.replace(",", "+").split("+") if p.strip())
        return tuple(str(p) for p in self.loss)

    def loss_config(self):  # -> preftune.losses.LossConfig
        # imported here, not at the top: the losses import torch, which `preftune --help` should not wait for
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
        return LossConfig(loss_types=self.loss_types(), loss_weights=weights,
                          **{name: getattr(self, name) for name in LOSS_OPTIONS})

    def fit_to_context(self, limit: int | None) -> tuple[TrainConfig, str | None]:
        """This config with max_length capped at a model's `limit` positions, and the line that says so; (self, None)
        when it fits. The rule is the data layer's, which `preftune inspect` uses too."""
        # the data layer owns the rule, one for train and inspect (imported here: config loads before any data)
        from preftune.data.limits import effective_limits

        fit = effective_limits(self.max_length, self.max_prompt_length, limit)
        if fit.note is None:
            return self, None
        return dataclasses.replace(self, max_length=fit.max_length, max_prompt_length=fit.max_prompt_length), fit.note

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "config") -> TrainConfig:
        check_keys(cls, values, where)
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
        values = read_yaml(path, cls)
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


def _construct(loader: yaml.SafeLoader, node: yaml.Node, cls: Any, name: str | None) -> Any:
    """A node's value; for a text option a plain scalar stays the text as written (2024-06-01, 123, 1.0), except
    null and, for options that also take booleans (resume), true/false."""
    found = option_named(cls, name) if name is not None else None
    if found is not None and _is_text(cls, name):
        kind, opt = found
        if isinstance(node, yaml.ScalarNode) and node.style is None and node.tag != _YAML_STR:
            if node.tag == _YAML_NULL or (node.tag == _YAML_BOOL and kind == "Any"):
                return loader.construct_object(node, deep=True)
            return node.value
        if isinstance(node, yaml.SequenceNode) and opt.text:
            return [_construct(loader, c, cls, name) if isinstance(c, yaml.ScalarNode) else
                    loader.construct_object(c, deep=True) for c in node.value]
    return loader.construct_object(node, deep=True)


def parse_yaml(text: str, where: str, *, cls: Any = None, name: str | None = None, mapping: bool = False) -> Any:
    """YAML text → values, bounded in size and alias expansion. `mapping`: a config file (top-level keys are
    option names of `cls`, default TrainConfig, each value read for its option); `name`: one option's value (a
    CLI flag)."""
    cls = TrainConfig if cls is None else cls
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
                out[key] = _construct(loader, v, cls, key if isinstance(key, str) else None)
            return out
        return _construct(loader, node, cls, name)
    except yaml.YAMLError as e:
        raise PreftuneError(f"{where} is not valid YAML ({str(e).splitlines()[0]}).") from None
    except (RecursionError, TypeError) as e:  # nesting deeper than the parser's stack; an unhashable key
        kind = "nested too deeply" if isinstance(e, RecursionError) else f"not a valid mapping ({e})"
        raise PreftuneError(f"{where} is {kind}; a config is a flat list of keys.") from None
    finally:
        if loader is not None:
            loader.dispose()


def flag_value(cls: Any, name: str, text: str) -> Any:
    """A CLI flag's value for option `name` of `cls`: text options as typed (`--output-dir 2024-06-01`,
    `--model 123` stay text), others read as YAML so `--beta 0.1`, `--lora true`, `--loss [sigmoid, sft]` work;
    unreadable YAML stays text (and is refused by the option's own check, naming it)."""
    found = option_named(cls, name)
    if found is None or found[0] in TEXT_TYPES or found[0].startswith("list[str]"):  # a list: one item a flag
        return text
    try:
        return parse_yaml(text, f"--{name.replace('_', '-')}", cls=cls, name=name)
    except PreftuneError:
        if len(text) > MAX_YAML_BYTES:
            raise
        return text


def read_yaml(path: str | Path, cls: Any = None) -> dict[str, Any]:
    """A YAML config file of options of `cls` (default TrainConfig), bounded (see parse_yaml)."""
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
    values = parse_yaml(text, f"config file {p}", cls=cls, mapping=True)
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise PreftuneError(f"config file {p} must be a mapping of keys to values, got {type(values).__name__}.")
    return values
