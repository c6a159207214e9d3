"""The options of `preftune inspect | eval | generate | plan | report | push`, declared with the schema TrainConfig
uses (preftune/options.py), sharing its definitions where an option is the same (model, batch size, lengths,
data fields, dtype, seed, sampling ...) with this command's default or help where it differs.

Each class checks its values when built, exactly as TrainConfig does, so a command refuses a bad number in one
sentence before it loads anything; the CLI builds the flags and `--help` from the same fields and hands the
checked values to the Python API (`run_eval`, `run_generate`, `run_inspect`, ...).
"""

from __future__ import annotations

import dataclasses
from dataclasses import MISSING, dataclass
from typing import Any

from preftune.errors import PreftuneError
from preftune.options import (
    BATCH_SIZE,
    BETA,
    CHOSEN_FIELD,
    DEVICE,
    DTYPE,
    FORMAT,
    LORA,
    LORA_R,
    MAX_LENGTH,
    MAX_NEW_TOKENS,
    MAX_PROMPT_LENGTH,
    MODEL,
    PROMPT_FIELD,
    PROMPT_TEMPLATE,
    RANKED,
    REJECTED_FIELD,
    SEED,
    SPLIT,
    TEMPERATURE,
    TOP_P,
    Option,
    need,
    option,
    paths,
    validate,
)

GB = 1024**3


def parse_memory(text: str) -> float:
    """'80GB', '80', '141 GiB', '24g' → bytes (GB read as GiB, as GPU vendors' 80GB cards report ~79.6 GiB)."""
    t = str(text).strip().lower().replace(" ", "").removesuffix("b").removesuffix("i").removesuffix("g")
    try:
        value = float(t)
    except ValueError:
        raise PreftuneError(f"--gpu-memory must look like 80GB, got {text!r}.") from None
    if not value > 0 or value == float("inf"):
        raise PreftuneError(f"--gpu-memory must be positive, got {text!r}.")
    return value * GB


def _memory(name: str, v: Any) -> Any:
    parse_memory(v)
    return v


def _texts(name: str, v: Any) -> Any:
    need(v is None or (isinstance(v, list) and len(v) > 0 and all(isinstance(x, (str, list)) for x in v)),
         f"{name} must be a list of prompts, got {v!r}.")
    return v


BASE_MODEL = Option(None, "Base model for a LoRA adapter folder (default: the one it names).", path=True)
RUN_MODEL = dataclasses.replace(MODEL, default=MISSING, help="Model folder, hub name or LoRA adapter folder (e.g. "
                                "RUN/final).")


class _Checked:
    """Options checked when built (the schema, then `rules`, the checks between options)."""

    def __post_init__(self) -> None:
        validate(self)
        self.rules()

    def rules(self) -> None:
        pass

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class InspectOptions(_Checked):
    """`preftune inspect DATA...`: audit a preference data file before training."""

    data: Any = option(MISSING, "Data file(s), glob or dataset folder.", text=True, path=True,
                       check=paths(allow_empty=False), flag={"positional": True, "nargs": "+"})
    model: str | None = MODEL.field(default=None, help="Also measure the model's own preference on the pairs (and "
                                    "use its tokenizer).")
    tokenizer: str | None = option(None, "A model folder or hub name whose tokenizer (and chat template) to use, "
                                   "without loading the model.", path=True)
    show: int = option(0, "Print the first N examples exactly as training sees them (with a tokenizer: the token "
                       "pieces at the prompt/answer boundary and at the end of each answer).", range="[0, inf)",
                       flag={"metavar": "N"})
    max_length: int = MAX_LENGTH.field()
    max_prompt_length: int = MAX_PROMPT_LENGTH.field()
    batch_size: int = BATCH_SIZE.field(help="Pairs per batch when the model scores them.")
    format: str = FORMAT.field()
    prompt_field: str = PROMPT_FIELD.field()
    chosen_field: str = CHOSEN_FIELD.field()
    rejected_field: str = REJECTED_FIELD.field()
    prompt_template: str | None = PROMPT_TEMPLATE.field()
    split: str | None = SPLIT.field()
    ranked: str = RANKED.field()
    output: str | None = option(None, "Write the audit as JSON here (a PNG and HTML report are written beside it).",
                                path=True)

    def rules(self) -> None:
        _lengths(self.max_length, self.max_prompt_length)
        need(not (self.model and self.tokenizer), "give --model (which brings its tokenizer) or --tokenizer, not both.")


@dataclass
class GenerateOptions(_Checked):
    """`preftune generate`: sample answers from a model (JSONL out)."""

    model: str = RUN_MODEL.field()
    prompt: list[str] | None = option(None, "A prompt (repeat for several).", check=_texts,
                                      flag={"action": "append"})
    data: str | None = option(None, "Prompts from a .jsonl/.json file (its prompt field) or a .txt file (one a "
                              "line).", path=True)
    base_model: str | None = BASE_MODEL.field()
    dtype: str = DTYPE.field()
    device: str | None = DEVICE.field()
    batch_size: int = BATCH_SIZE.field(help="Prompts per batch.")
    max_new_tokens: int = MAX_NEW_TOKENS.field()
    temperature: float = TEMPERATURE.field()
    top_p: float = TOP_P.field()
    top_k: int = option(0, "Keep only the k most likely tokens (0 = off).", range="[0, inf)")
    seed: int = SEED.field(default=0, help="Seed of the sampling.")
    prompt_field: str = PROMPT_FIELD.field()
    chat: bool = option(False, "Wrap string prompts in the tokenizer's chat template.")
    output: str | None = option(None, "JSONL file to write (default: stdout).", path=True)

    def rules(self) -> None:
        need((self.prompt is None) != (self.data is None), "give the prompts with --prompt (repeat for several) or "
             "--data FILE, one of the two.")


@dataclass
class EvalOptions(_Checked):
    """`preftune eval`: a model against its reference on held-out pairs (see preftune/evaluate.py)."""

    model: str = RUN_MODEL.field()
    data: Any = option(MISSING, "Held-out preference data (any format train reads).", text=True, path=True, check=paths(allow_empty=False), flag={"nargs": "+"})
    reference: str | None = option(None, "Reference model (default: the run's starting model for RUN/final, the base "
                                   "for a LoRA adapter folder).", path=True)
    base_model: str | None = BASE_MODEL.field()
    beta: float | None = BETA.field(default=None, help="β of the implicit reward (default: the run's, else 0.1).")
    judge: str | None = option(None, "A pairwise judge as module:function or file.py:function (see the README).")
    generate: int = option(32, "Prompts both models answer (lengths, judge; 0 = none).", range="[0, inf)")
    kl_samples: int = option(32, "Prompts the model samples for the KL estimate (0 = none).", range="[0, inf)")
    dtype: str = DTYPE.field()
    device: str | None = DEVICE.field()
    batch_size: int = BATCH_SIZE.field(help="Pairs or prompts per batch.")
    max_length: int | None = MAX_LENGTH.field(default=None, help="Longest prompt+answer in tokens (default: the "
                                              "run's, else 1024).")
    max_prompt_length: int | None = MAX_PROMPT_LENGTH.field(default=None, help="Longest prompt in tokens (default: "
                                                            "the run's, else 512).")
    max_new_tokens: int = MAX_NEW_TOKENS.field()
    temperature: float = TEMPERATURE.field()
    top_p: float = TOP_P.field()
    seed: int = SEED.field(default=0, help="Seed of the sampling.")
    format: str = FORMAT.field()
    prompt_field: str = PROMPT_FIELD.field()
    chosen_field: str = CHOSEN_FIELD.field()
    rejected_field: str = REJECTED_FIELD.field()
    output: str | None = option(None, "Write the JSON here (default: RUN/eval.json for a run's final/ folder).",
                                path=True)

    def rules(self) -> None:
        if self.max_length is not None and self.max_prompt_length is not None:
            _lengths(self.max_length, self.max_prompt_length)
        need(self.judge is None or self.generate >= 1, "a judge needs answers to compare; pass --generate N with "
             "N >= 1.")


@dataclass
class PlanOptions(_Checked):
    """`preftune plan`: memory per GPU under DDP, FSDP2 and ZeRO, and the smallest setup that fits."""

    model: str = MODEL.field(default=MISSING, help="Model folder, its config.json, or a hub name in the local cache.")
    gpus: int = option(8, "GPUs to show the table for.", range="[1, inf)")
    gpu_memory: str = option("80GB", "Memory of one GPU.", check=_memory)
    lora: bool = LORA.field(help="Recommend for LoRA instead of full fine-tuning.")
    lora_r: int = LORA_R.field()
    seq_len: int = option(1024, "max_length of the run.", range="[2, inf)")
    batch_size: int = BATCH_SIZE.field(default=4, help="Pairs per micro-batch per GPU.")
    reference: str = option("precomputed", "What the run holds as its reference: precomputed (auto, or no reference: "
                            "nothing held) or copy (a frozen copy of the model; what --sync-ref-model needs).",
                            choices=("precomputed", "copy"))


@dataclass
class ReportOptions(_Checked):
    """`preftune report RUN_DIR`: HTML page and PNGs of a run's curves (works while it runs)."""

    run_dir: str = option(MISSING, "The run folder (a training run's output_dir).", path=True,
                          flag={"positional": True})
    output_dir: str | None = option(None, "Where to write (default: RUN_DIR/report).", path=True)


@dataclass
class PushOptions(_Checked):
    """`preftune push RUN_DIR REPO`: upload a run's final model (and model card) to the Hugging Face Hub."""

    run_dir: str = option(MISSING, "A finished run folder (its final/ is uploaded) or a model folder.", path=True,
                          flag={"positional": True})
    repo: str = option(MISSING, "Hub repository, e.g. user/my-model (created if absent).", flag={"positional": True})
    public: bool = option(False, "Create the repository as public (default: private).")
    commit_message: str | None = option(None, "The commit message of the upload.")


def _lengths(max_length: int, max_prompt_length: int) -> None:
    need(max_prompt_length < max_length, f"max_prompt_length ({max_prompt_length}) must be smaller than max_length "
         f"({max_length}) so that some answer tokens fit.")
