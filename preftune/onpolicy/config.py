"""The options of `preftune pairs`, declared with the option schema (preftune/options.py) that TrainConfig and the
other commands use: the CLI flags, `--help`, the YAML keys and the Python keyword arguments are these fields.

Options a rerun into the same output may change are marked `may_change` (batch sizes, device, timeouts...); the
others are what the rows depend on (ROW_SETTINGS), and a rerun must match them (`row_settings` in pairs.py). The model, the
prompts and the judge are compared by content, not by the path's spelling.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from preftune.command_options import BASE_MODEL
from preftune.onpolicy.select import RULES
from preftune.options import (
    BATCH_SIZE,
    DEVICE,
    DTYPE,
    JUDGE_OPTIONS,
    MAX_NEW_TOKENS,
    MISSING_EOS_PENALTY,
    MODEL,
    PROMPT_FIELD,
    SEED,
    TEMPERATURE,
    TOP_K,
    TOP_P,
    check_keys,
    include_options,
    need,
    option,
    options_of,
    paths,
    validate,
)

_f = option


# The judge's options follow batch_size; a rerun compares the judge by what it is (a function's source file, a reward
# model's weights, an endpoint's model and template), not by its options' spelling.
@dataclass
@include_options(JUDGE_OPTIONS, after="batch_size")
class PairsConfig:
    """Everything a `preftune pairs` run needs."""

    # --- where from, where to (compared by content on a rerun)
    model: str = MODEL.field(help="Policy to sample from: a model folder, a hub name or a LoRA adapter folder (e.g. RUN/final).")
    prompts: Any = _f("", "Prompts: any file train or sft reads (its prompt field, chat messages or the prompts of a pairs file), or a .txt file with one prompt a line.",
                      text=True, path=True, check=paths(allow_empty=True), may_change=True)
    output: str = _f("", "JSONL file of pairs to write (train reads it as is); OUT.summary.json and the state folder OUT.state/ go beside it.",
                     path=True, may_change=True)
    prompt_field: str = PROMPT_FIELD.field()
    chat: bool = _f(False, "Wrap plain-text prompts in the tokenizer's chat template (message prompts always use it); the pairs are written as messages.")
    base_model: str | None = BASE_MODEL.field()
    dtype: str = DTYPE.field(help="Weights dtype of the policy (and of a reward-model judge): float32, bfloat16 or float16.")
    device: str | None = DEVICE.field(help="cpu, cuda, cuda:1, ... (default: cuda when present; process R of a torchrun launch takes cuda:LOCAL_RANK).",
                                      may_change=True)

    # --- sampling
    samples: int = _f(4, "Answers sampled per prompt (K); identical answers are judged once.", range="[2, inf)",
                      why="a pair needs two answers to compare")
    max_new_tokens: int = MAX_NEW_TOKENS.field(help="Longest answer in tokens; longer ones are cut there (and counted), as are answers that reach the model's last position.")
    temperature: float = TEMPERATURE.field(default=1.0, help="Sampling temperature (1 samples the policy's own distribution, which on-policy DPO assumes).",
                                           range="(0, inf)", why="greedy decoding gives every sample the same answer")
    top_p: float = TOP_P.field()
    top_k: int = TOP_K.field()
    seed: int = SEED.field(default=0, help="Seed of every answer's own random stream (and of the pairwise coin and best-random's draw).")
    batch_size: int = BATCH_SIZE.field(default=32, help="Answers decoded together (batch_size // samples prompts at a time); the rows do not depend on it.")

    # --- selection
    select: str = _f("best-worst", "Which answers make pairs: best-worst, best-random (seeded) or all-pairs.", choices=RULES)
    min_gap: float = _f(0.0, "Drop a pair whose chosen-minus-rejected score is below this (ties are always dropped).", range="[0, inf)")
    max_pairs_per_prompt: int = _f(0, "At most this many pairs per prompt with all-pairs, largest gaps first (0 = all).", range="[0, inf)")
    missing_eos_penalty: float | None = MISSING_EOS_PENALTY.field()

    # --- running
    trust_remote_code: bool = _f(False, "Allow model code shipped inside the model folders to run. Only for folders you trust.", may_change=True)
    allow_pickle: bool = _f(False, "Allow loading .bin/.pt (pickle) weights; by default only safetensors load.", may_change=True)
    progress: bool = _f(True, "Show a progress bar.", may_change=True)

    def __post_init__(self) -> None:
        validate(self)
        need(bool(self.model), "no model given; pass --model PATH (the policy to sample from).")
        need(bool(self.prompts), "no prompts given; pass --prompts FILE.")
        need(str(self.output).endswith(".jsonl"), f"--output must name a .jsonl file (train reads it), got {self.output!r}.")
        need((self.judge is None) != (self.judge_url is None),
             "pass one judge: --judge (a function or a reward-model folder) or --judge-url with --judge-model.")
        need(self.judge_url is None or bool(self.judge_model),
             "--judge-url needs --judge-model, the name of the model the endpoint serves.")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "config") -> PairsConfig:
        check_keys(cls, values, where, command="pairs")
        return cls(**values)


# What the rows depend on besides the model, the prompts and the judge (which are compared by content): a rerun
# into the same output must have the same values.
ROW_SETTINGS = tuple(name for name, _, opt in options_of(PairsConfig) if not opt.may_change)
