"""The option schema: every option of every command is declared once, as a dataclass field holding an `Option`.

    batch_size: int = BATCH_SIZE.field()                     # an option several commands share (below)
    lora_r: int = option(16, "LoRA rank.", range="[1, inf)")  # an option of one command

An `Option` says everything about a setting: its default and one-line help, its type (the field's annotation),
its allowed choices or range (open or closed at each end), whether a resumed run may change it, whether YAML must
keep it as text, whether it is a path, and whether it is a loss hyper-parameter. From the declarations come the
checks (`validate`, run by every options class in `__post_init__`), the command-line flags and `--help`
(cli.py), the YAML reading (config.py: text stays text), the settings a resume may change (outputs/identity.py)
and the loss hyper-parameters LossConfig holds (`LOSS_OPTIONS`, handed over by `TrainConfig.loss_config`).

The options several commands share are defined at the end of this module, once, with a per-command default or
help where they differ (`SEED.field(default=0)`).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from preftune.errors import PreftuneError

MAX_INT = 2**31 - 1  # counts past this are typos, and overflow int32 tensors and progress bars
MAX_SEED = 2**32 - 1  # numpy's seed range
TEXT_TYPES = ("str", "str | None")


@dataclass(frozen=True)
class Option:
    """One setting (see the module docstring). `range` is written as in mathematics: "[0, 0.5)", "(0, inf)"."""

    default: Any
    help: str
    choices: tuple[str, ...] = ()
    range: str | None = None
    may_change: bool = False  # a resumed run may change it: it never changes what the steps already taken mean
    text: bool = False  # YAML and flags keep it as written (a name, a path) though its type also takes lists
    path: bool = False  # path objects become plain text (config.yaml and the resume check store plain values)
    loss: bool = False  # a loss hyper-parameter (LossConfig holds it)
    why: str = ""  # said after a refusal of its range
    check: Callable[[str, Any], Any] | None = None  # (name, value) → the value to keep, or PreftuneError
    int_max: int = MAX_INT
    kind: str | None = None  # the type, for options added to a class by `include_options` (else the default's)
    flag: Mapping[str, Any] = field(default_factory=dict)  # argparse extras: positional, nargs, required, metavar

    def field(self, **changes: Any) -> Any:
        """This option as a dataclass field, with `changes` (a command's own default or help)."""
        opt = dataclasses.replace(self, **changes) if changes else self
        if isinstance(opt.default, (list, dict)):
            return field(default_factory=lambda: type(opt.default)(opt.default), metadata={"option": opt})
        return field(default=opt.default, metadata={"option": opt})

    @property
    def bounds(self) -> tuple[float | None, bool, float | None, bool]:
        """(lowest, lowest allowed?, highest, highest allowed?); None: no bound on that side."""
        return _parse_range(self.range) if self.range else (None, False, None, False)


def option(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field declaring an option of one command (see `Option` for the keywords)."""
    return Option(default, help, **kw).field()


_RANGE = re.compile(r"^([\[(])\s*([^,\s]+)\s*,\s*([^\])\s]+)\s*([\])])$")


def _parse_range(text: str) -> tuple[float | None, bool, float | None, bool]:
    m = _RANGE.match(text)
    if m is None:
        raise ValueError(f"range {text!r} is not like '[0, 1)'")

    def num(s: str) -> float | None:
        return None if s.lstrip("+-") == "inf" else (int(s) if re.fullmatch(r"-?\d+", s) else float(s))

    return num(m.group(2)), m.group(1) == "[", num(m.group(3)), m.group(4) == "]"


def include_options(options: Mapping[str, Option], after: str | None = None) -> Callable[[type], type]:
    """A class decorator (under @dataclass) that adds `options` as fields, after the field `after` (else last):
    how TrainConfig and LossConfig both hold every loss hyper-parameter declared in LOSS_OPTIONS."""

    def add(cls: type) -> type:
        own = dict(cls.__dict__.get("__annotations__", {}))
        new = {name: opt.kind or type(opt.default).__name__ for name, opt in options.items()}
        keys = list(own)
        at = keys.index(after) + 1 if after is not None else len(keys)
        cls.__annotations__ = {**{k: own[k] for k in keys[:at]}, **new, **{k: own[k] for k in keys[at:]}}
        for name, opt in options.items():
            setattr(cls, name, opt.field())
        return cls

    return add


# ----------------------------------------------------------------------------------------------- reading

def options_of(cls: Any) -> list[tuple[str, str, Option]]:
    """(name, annotation as written, Option) of every declared option of an options class (or instance)."""
    return [(f.name, str(f.type), f.metadata["option"]) for f in dataclasses.fields(cls) if "option" in f.metadata]


def option_named(cls: Any, name: str) -> tuple[str, Option] | None:
    """(annotation, Option) of one option, or None when `cls` has no such option."""
    return next(((kind, opt) for n, kind, opt in options_of(cls) if n == name), None)


def may_change(cls: Any) -> frozenset[str]:
    """The settings a resumed run may change (outputs/identity.py compares all the others)."""
    return frozenset(name for name, _, opt in options_of(cls) if opt.may_change)


def is_text(cls: Any, name: str) -> bool:
    """Whether an option's value is text (a path, a name, a choice) that YAML must not reinterpret."""
    found = option_named(cls, name)
    return found is not None and (found[1].text or found[0] in TEXT_TYPES)


def check_keys(cls: Any, values: Mapping[str, Any], where: str, command: str = "train") -> None:
    """Refuse unknown keys, naming the nearest valid one (a typo must never be silently ignored)."""
    valid = [name for name, _, _ in options_of(cls)]
    for key in values:
        if key not in valid:
            hint = difflib.get_close_matches(str(key).replace("-", "_"), valid, n=1, cutoff=0.5)
            extra = f"; did you mean {hint[0]!r}?" if hint else f"; see `preftune {command} --help` for the valid keys."
            raise PreftuneError(f"unknown config key {key!r} in {where}{extra}")


# ----------------------------------------------------------------------------------------------- checking

def need(cond: bool, msg: str) -> None:
    if not cond:
        raise PreftuneError(msg)


def validate(obj: Any) -> None:
    """Check every declared option of `obj` (type, choices, range, its own check) and keep the normalised value
    (numbers written as text read as numbers, paths as plain text); the first bad one is one sentence."""
    for name, kind, opt in options_of(obj):
        object.__setattr__(obj, name, check_value(name, kind, opt, getattr(obj, name)))


def check_value(name: str, kind: str, opt: Option, v: Any) -> Any:
    """One option's value, checked and normalised (see `validate`)."""
    if opt.path:
        v = plain_path(v)
    for text in (v if isinstance(v, list) else [v]):
        need(not (isinstance(text, str) and "\x00" in text), f"{name} contains a NUL character; remove it.")
    number = kind.removesuffix(" | None")
    if isinstance(v, str) and number in ("int", "float"):
        v = _number_from_text(v, number)
    if opt.check is not None:
        v = opt.check(name, v)
    if v is None and (kind.endswith("| None") or kind == "Any"):
        return v
    if kind == "bool":
        need(isinstance(v, bool), f"{name} must be true or false, got {v!r}.")
    elif kind in TEXT_TYPES:
        need(isinstance(v, str), f"{name} must be text, got {type(v).__name__} {v!r}.")
    elif number == "float":
        need(isinstance(v, (int, float)) and not isinstance(v, bool), f"{name} must be a number, got {v!r}.")
        need(math.isfinite(v), f"{name} must be a finite number, got {v!r}.")
    elif number == "int":
        need(isinstance(v, int) and not isinstance(v, bool), f"{name} must be a whole number, got {v!r}.")
        need(v <= opt.int_max, f"{name} must be at most {opt.int_max}, got {v}.")
    if opt.choices:
        _check_choice(name, v, opt.choices)
    if opt.range:
        _check_range(name, v, opt, integer=number == "int")
    return float(v) if number == "float" else v  # after the checks, whose messages quote the value as given


def _number_from_text(v: str, number: str) -> Any:
    # YAML 1.1 reads `1e-6` (no dot) as a string; accept it as the number everybody means.
    try:
        num = float(v)
    except ValueError:
        return v
    if number == "int" and math.isfinite(num) and num.is_integer():
        return int(num)
    return num


def _check_choice(name: str, v: Any, allowed: tuple[str, ...]) -> None:
    if v not in allowed:
        hint = difflib.get_close_matches(str(v), allowed, n=1)
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise PreftuneError(f"{name} must be one of {', '.join(allowed)}; got {v!r}{extra}.")


def range_text(opt: Option, integer: bool) -> str:
    """The range as a phrase: "at least 1", "> 0", "in [0, 0.5)"."""
    low, low_in, high, high_in = opt.bounds
    if high is None:
        return f"at least {low}" if integer and low_in else f"{'>=' if low_in else '>'} {low}"
    if low is None:
        return f"{'<=' if high_in else '<'} {high:g}"
    return f"in {'[' if low_in else '('}{low}, {high:g}{']' if high_in else ')'}"


def _check_range(name: str, v: Any, opt: Option, integer: bool) -> None:
    low, low_in, high, high_in = opt.bounds
    ok = (low is None or (v >= low if low_in else v > low)) and (high is None or (v <= high if high_in else v < high))
    need(ok, f"{name} must be {range_text(opt, integer)} (got {v}){'; ' + opt.why if opt.why else ''}.")


def plain_path(v: Any) -> Any:
    """Path objects → str (lists of them too)."""
    if isinstance(v, os.PathLike):
        return os.fspath(v)
    if isinstance(v, tuple) or (isinstance(v, list) and any(isinstance(x, os.PathLike) for x in v)):
        return [os.fspath(x) if isinstance(x, os.PathLike) else x for x in v]
    return v


# ----------------------------------------------------------------------------------------------- checks

def paths(allow_empty: bool) -> Callable[[str, Any], Any]:
    """A check: a path or a (non-empty, unless `allow_empty`) list of paths."""

    def check(name: str, v: Any) -> Any:
        ok = isinstance(v, str) or (isinstance(v, list) and (allow_empty or len(v) > 0)
                                    and all(isinstance(x, str) for x in v))
        need(v is None or ok, f"{name} must be a path or a list of paths, got {v!r}.")
        return v

    return check


def names(name: str, v: Any) -> Any:
    """A check: a name or a non-empty list of names."""
    need(isinstance(v, str) or (isinstance(v, (list, tuple)) and len(v) > 0 and all(isinstance(x, str) for x in v)),
         f"{name} must be a name or a list of names, got {v!r}.")
    return v


def device_name(name: str, v: Any) -> Any:
    """A check: a torch device this machine has (cpu, cuda, cuda:1, mps ...), or None for the default."""
    if v is None:
        return v
    need(isinstance(v, str), f"{name} must be text, got {type(v).__name__} {v!r}.")
    import torch  # only the commands with a --device flag pay for it, and they load a model next anyway

    try:
        dev = torch.device(v)
    except (RuntimeError, ValueError):
        raise PreftuneError(f"{name} must name a device such as cpu, cuda or cuda:1, got {v!r}.") from None
    if dev.type == "cuda":
        need(torch.cuda.is_available(), f"{name} {v!r} asks for a GPU but this torch sees none (a CPU build, or "
             "no GPU visible); use --device cpu.")
        need(dev.index is None or dev.index < torch.cuda.device_count(),
             f"{name} {v!r} names GPU {dev.index} but {torch.cuda.device_count()} are visible.")
    elif dev.type == "mps":
        need(torch.backends.mps.is_available(), f"{name} 'mps' asks for Apple's GPU, which this torch cannot "
             "use; use --device cpu.")
    else:
        need(dev.type == "cpu", f"{name} {v!r} is not a device preftune runs on; use cpu, cuda or mps.")
    return v


# ----------------------------------------------------------------------------------------------- shared

# Options several commands share: the same checks everywhere, a command's own default or help where it differs.
MODEL = Option("", "Model to fine-tune: a local Hugging Face folder or a hub name.", path=True, may_change=True)
BATCH_SIZE = Option(8, "Pairs per micro-batch per device.", range="[1, inf)", may_change=True)
MAX_LENGTH = Option(1024, "Longest prompt+completion in tokens; completions are truncated from the right to fit.",
                    range="[2, inf)")
MAX_PROMPT_LENGTH = Option(512, "Longest prompt in tokens; prompts are truncated from the left to fit.",
                           range="[1, inf)")
FORMAT = Option("auto", "Data format: auto, standard, conversational or implicit.",
                choices=("auto", "standard", "conversational", "implicit"))
PROMPT_FIELD = Option("prompt", "Column holding the prompt (dotted path for nested fields).")
SPLIT = Option(None, "Split of a saved DatasetDict folder or hub dataset to read (default: 'train', or its only split).")
RANKED = Option("best-vs-next", "Pairs from rows ranking more than two answers (Alpaca output lists, Nectar): "
                "best-vs-next (LLaMA-Factory's rule), best-vs-worst or all-pairs.",
                choices=("best-vs-next", "best-vs-worst", "all-pairs"))
CHOSEN_FIELD = Option("chosen", "Column holding the preferred answer.")
REJECTED_FIELD = Option("rejected", "Column holding the dispreferred answer.")
PROMPT_TEMPLATE = Option(None, "Build the prompt from several fields, e.g. '{system}\\n\\n{question}' (fields are "
                         "dotted paths; an empty field drops the text before it).")
MIXED_PRECISIONS = ("no", "bf16", "fp16")  # distributed.PRECISIONS holds the autocast dtype of each but "no"
DTYPE = Option("float32", "Weights dtype: float32, bfloat16 or float16.", choices=("float32", "bfloat16", "float16"))
SEED = Option(42, "Seed for data order, initialisation and dropout.", range="[0, inf)", int_max=MAX_SEED)
LORA = Option(False, "Train LoRA adapters instead of all weights.")
LORA_R = Option(16, "LoRA rank.", range="[1, inf)")
DEVICE = Option(None, "cpu, cuda, cuda:1, ... (default: cuda when present).", check=device_name)
MAX_NEW_TOKENS = Option(128, "Longest answer in new tokens.", range="[1, inf)")
TEMPERATURE = Option(0.0, "0 = greedy decoding (default).", range="[0, inf)")
TOP_P = Option(1.0, "Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p.",
               range="(0, 1]")

# The judge of sampled answers (`preftune pairs`, `iterate`, `train --online`; preftune/onpolicy/judges.py says what
# each kind is): PairsConfig and TrainConfig both hold these (`include_options`).
JUDGE_TYPES = ("auto", "pointwise", "pairwise")
JUDGE_OPTIONS: dict[str, Option] = {
    "judge": Option(None, "Judge: module:function or file.py:function (pointwise score(prompt, answer) or pairwise "
                    "judge(prompt, a, b)), or a reward-model folder.", text=True, may_change=True, kind="Any"),
    "judge_type": Option("auto", "auto (from the function's arguments), pointwise or pairwise.", choices=JUDGE_TYPES),
    "judge_url": Option(None, "OpenAI-compatible endpoint to judge with instead (e.g. http://127.0.0.1:8000/v1).",
                        may_change=True, kind="str | None"),
    "judge_model": Option(None, "Model name the endpoint serves (with judge_url).", may_change=True,
                          kind="str | None"),
    "judge_template": Option(None, "Endpoint prompt with {prompt} and {answer}, or a file holding it (default: a "
                             "1-10 score, see the README).", may_change=True, kind="str | None"),
    "judge_timeout": Option(60.0, "Seconds one judge call may take (0 = no limit).", range="[0, inf)", may_change=True),
    "judge_retries": Option(3, "Retries of an endpoint call that failed (timeout, refused, HTTP 408/429/5xx).",
                            range="[0, inf)", may_change=True),
    "judge_backoff": Option(1.0, "Seconds before the first retry; doubled each time.", range="[0, inf)",
                            may_change=True),
    "judge_concurrency": Option(4, "Endpoint requests in flight at once.", range="[1, inf)", may_change=True),
    "judge_batch_size": Option(16, "Texts per forward of a reward-model judge.", range="[1, inf)", may_change=True),
    "judge_api_key_env": Option("OPENAI_API_KEY", "Environment variable holding the endpoint's API key (sent as a "
                                "bearer token when set).", may_change=True),
}
MISSING_EOS_PENALTY = Option(None, "Subtract this from the score of an answer cut at max_new_tokens (TRL's "
                             "missing_eos_penalty; default: none).", range="[0, inf)", kind="float | None")
TOP_K = Option(0, "Keep the k most likely tokens (0 = off).", range="[0, inf)")

# Online DPO (`preftune train --online`, TRL's OnlineDPOTrainer; preftune/onpolicy/online.py): TrainConfig holds these
# after data_cache_dir. Its pairs depend on its judge: a resume may change how the judge is called, not which it is.
ONLINE_OPTIONS: dict[str, Option] = {
    "online": Option(False, "Online DPO: at every step sample two answers per prompt of --prompts from the current "
                     "policy, judge them (--judge) and train on the pair; no --data."),
    "prompts": Option(None, "Prompts of an --online run: any file `preftune pairs` reads (a prompt field, chat "
                      "messages, the prompts of a pairs file, or a .txt file with one prompt a line).", text=True,
                      path=True, check=paths(allow_empty=False), may_change=True, kind="Any"),  # compared by ids
    "max_new_tokens": dataclasses.replace(MAX_NEW_TOKENS, default=64, help="--online: longest sampled answer in "
                                          "tokens (TRL's default 64)."),
    "temperature": dataclasses.replace(TEMPERATURE, default=0.9, range="(0, inf)", why="two greedy answers are one",
                                       help="--online: sampling temperature (TRL's default 0.9)."),
    "top_p": dataclasses.replace(TOP_P, help="--online: nucleus sampling (1 = off)."),
    "top_k": dataclasses.replace(TOP_K, help="--online: keep the k most likely tokens (0 = off)."),
    "missing_eos_penalty": MISSING_EOS_PENALTY,
    **{name: dataclasses.replace(opt, may_change=False) if name in ("judge", "judge_url", "judge_model",
                                                                    "judge_template") else opt
       for name, opt in JUDGE_OPTIONS.items()},
}


def online_rules(cfg: Any) -> None:
    """The rules between a TrainConfig's options when `online` is on (one sentence each)."""
    need(bool(cfg.prompts), "--online samples its pairs from prompts; pass --prompts FILE.")
    need(not cfg.data and not cfg.eval_data and not cfg.eval_fraction, "--online trains on pairs it samples and "
         "judges every step; pass --prompts, not --data, --eval-data or --eval-fraction.")
    need((cfg.judge is None) != (cfg.judge_url is None), "--online needs one judge: --judge (a function or a "
         "reward-model folder) or --judge-url with --judge-model.")
    need(cfg.reference != "precomputed", "an --online run's pairs are new every step, so its reference is scored "
         "live; use --reference auto, copy or lora_disabled, not precomputed.")
    need(cfg.max_new_tokens <= cfg.max_length - cfg.max_prompt_length,
         f"--max-new-tokens {cfg.max_new_tokens} does not fit after a prompt of max_prompt_length "
         f"{cfg.max_prompt_length} within max_length {cfg.max_length}; lower it or raise max_length.")
    if cfg.reference == "auto":  # live: the starting weights, a copy (or the base under LoRA adapters)
        cfg.reference = "lora_disabled" if cfg.lora else "copy"

# The loss hyper-parameters: TrainConfig and LossConfig both hold each of these (`include_options`), and a
# loss reads them in its registry adapter (losses/__init__.py). A new one is one line here.
F_DIVERGENCES: tuple[str, ...] = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
"""The values of `f_divergence_type` (TRL's names); losses/transforms.py computes each."""
BETA = Option(0.1, "Strength of the KL anchor to the reference: larger keeps the policy closer to it (0.1 is usual).",
              range="(0, inf)", loss=True, why="it is the strength of the KL anchor: larger keeps the policy closer "
              "to the reference; 0.1 is the usual default")
LOSS_OPTIONS: dict[str, Option] = {
    "beta": BETA,
    "label_smoothing": Option(0.0, "Assumed share of flipped labels (conservative DPO / rDPO), in [0, 0.5).",
                              range="[0, 0.5)", loss=True),
    "simpo_gamma": Option(0.5, "SimPO target reward margin gamma.", range="[0, inf)", loss=True),
    "dpop_lambda": Option(50.0, "DPO-Positive penalty weight lambda.", range="[0, inf)", loss=True),
    "sft_weight": Option(0.0, "Weight of an added NLL term on the chosen response (RPO alpha).", range="[0, inf)",
                         loss=True),
    "cpo_alpha": Option(1.0, "Weight of CPO's NLL term on the chosen response (loss cpo).", range="[0, inf)",
                        loss=True),
    "discopop_tau": Option(0.05, "DiscoPOP's temperature tau (loss discopop).", range="(0, inf)", loss=True),
    "f_divergence_type": Option("reverse_kl", "f-DPO divergence for the reward-gap losses: reverse_kl (DPO), "
                                "forward_kl, js_divergence or alpha_divergence.", choices=F_DIVERGENCES, loss=True),
    "f_alpha_divergence_coef": Option(0.5, "alpha of f_divergence_type alpha_divergence, in (0, 1).", range="(0, 1)",
                                      loss=True, why="alpha -> 0 is reverse_kl and alpha = 1 forward_kl; use those "
                                      "f_divergence_type values"),
    "use_weighting": Option(False, "WPO: weight each pair's loss by how likely the policy is to write both answers "
                            "(exp of their per-token log-probs, aligned), no gradient.", loss=True),
    "ld_alpha": Option(None, "LD-DPO: weight of the tokens past the shorter answer's length in every log-prob the "
                       "loss reads (1 = plain, 0 = cut them); unset = off.", range="[0, 1]", kind="float | None",
                       loss=True),
    "sync_ref_model": Option(False, "TR-DPO: move the reference toward the policy every ref_model_sync_steps "
                             "steps (needs reference copy; auto picks it).", loss=True),
    "ref_model_mixup_alpha": Option(0.6, "TR-DPO: reference <- alpha * policy + (1 - alpha) * reference at each "
                                    "sync (1 = copy the policy).", range="(0, 1]", loss=True),
    "ref_model_sync_steps": Option(512, "TR-DPO: optimizer steps between two reference syncs.", range="[1, inf)",
                                   loss=True),
    "desirable_weight": Option(1.0, "KTO / apo_zero_unpaired: weight of the desirable examples' losses (lambda_D).",
                               range="[0, inf)", loss=True),
    "undesirable_weight": Option(1.0, "KTO / apo_zero_unpaired: weight of the undesirable examples' losses "
                                 "(lambda_U).", range="[0, inf)", loss=True),
}
