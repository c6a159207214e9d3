"""The options of `preftune iterate`: its own (rounds, reference mode, evaluation, collapse check) plus the options
of `preftune pairs` and `preftune train`, taken from their declarations (PairsConfig, TrainConfig), not copied:
a flag means the same in all three commands, with the same range and help.

Left out are the options iterate sets itself each round (the model a round starts from, its prompts, pairs file
and run folder, the reference model, resuming) and train's data-layout options (the pairs are written by
`pairs`, in the layout train reads). Two names differ: pairs' `batch_size` (answers decoded together) is
`sample_batch_size` here, since `batch_size` is train's (pairs per micro-batch). The defaults that differ from
pairs' and train's own were chosen by measurement on the news demo's SFT model (BENCHMARKS.md, "iterate").
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from preftune.config import TrainConfig, read_yaml
from preftune.onpolicy.config import PairsConfig
from preftune.options import (
    JUDGE_OPTIONS,
    MODEL,
    Option,
    check_keys,
    include_options,
    need,
    option,
    options_of,
    paths,
    validate,
)

_f = option

# The options of pairs and train that iterate sets per round, or that mean nothing for pairs it wrote itself.
PAIRS_SET_PER_ROUND = ("model", "prompts", "output", "base_model")
TRAIN_SET_PER_ROUND = ("model", "data", "output_dir", "eval_data", "eval_fraction", "reference_model", "resume",
                       "resume_force", "overwrite", "push_to_hub", "hub_private", "eval_steps", "eval_batch_size",
                       "format", "chosen_field", "rejected_field", "completion_field", "prompt_template",
                       "skip_invalid", "data_cache_dir", "split", "eval_split", "ranked", "prompt_field",
                       # online DPO's (the sampling and judge options a round has are pairs')
                       "online", "prompts", "max_new_tokens", "temperature", "top_p", "top_k", "missing_eos_penalty",
                       *JUDGE_OPTIONS)
RENAMED = {"batch_size": "sample_batch_size"}  # pairs' name → iterate's (train keeps batch_size)
# Defaults chosen by measurement (BENCHMARKS.md, "iterate"); the rest are pairs' and train's own (K 4 at temperature
# 1, one epoch of the round's pairs, the round's model as reference). The learning rate stays train's (1e-6): the best
# rate depends on the model's size (the demo's 0.4M-parameter model learns best at 3e-4 to 1e-3, which would wreck
# a 7B model), so it is the one setting to pass.
DEFAULTS: dict[str, Any] = {"beta": 0.5, "sft_weight": 1.0, "batch_size": 16, "seed": 0}
PAIRS_NAMES: dict[str, str] = {}  # iterate's name → pairs' name, for every option a round's pairs run takes
TRAIN_NAMES: list[str] = []  # the options a round's train run takes (same names)


def _shared() -> dict[str, Option]:
    """Pairs' options, then train's (an option both declare, such as seed or dtype, is pairs' declaration)."""
    out: dict[str, Option] = {}
    for cls, skip in ((PairsConfig, PAIRS_SET_PER_ROUND), (TrainConfig, TRAIN_SET_PER_ROUND)):
        for name, kind, opt in options_of(cls):
            if name in skip:
                continue
            new = RENAMED.get(name, name) if cls is PairsConfig else name
            if cls is PairsConfig:
                PAIRS_NAMES[new] = name
            else:
                TRAIN_NAMES.append(name)
            if new not in out:
                changes = {"default": DEFAULTS[new]} if new in DEFAULTS else {}
                out[new] = dataclasses.replace(opt, kind=kind, **changes)
    return out


SHARED = _shared()


@dataclass
@include_options(SHARED)
class IterateConfig:
    """Everything a `preftune iterate` run needs: rounds of on-policy pairs → DPO → held-out evaluation."""

    # --- where from, where to
    model: str = MODEL.field(help="The first model (usually the SFT model): round 1 samples from it and trains it; "
                             "every evaluation compares with it.")
    prompts: Any = _f("", "Training prompts: any file pairs reads (a prompt field, chat messages, the prompts of a "
                      "pairs file, or a .txt file with one prompt a line).", text=True, path=True,
                      check=paths(allow_empty=True))
    output_dir: str = _f("", "Run folder: round-N/ (pairs, train run, evaluation) per round, rounds.json, report/.",
                         path=True, may_change=True)

    # --- rounds
    rounds: int = _f(3, "Rounds of pairs → DPO → evaluation (a resumed run may ask for more).", range="[1, inf)",
                     may_change=True, why="a run is at least one round")
    reference_mode: str = _f("round", "DPO's reference in round r: round (the round's starting model, as in "
                             "iterative DPO) or fixed (the first model in every round).", choices=("round", "fixed"))
    prompts_per_round: int = _f(0, "Training prompts per round: 0 = all of them every round; N = the next N in a "
                                "seeded order, so the rounds see different prompts (wrapping around).",
                                range="[0, inf)")

    # --- held-out evaluation
    eval_prompts: Any = _f(None, "Held-out prompts for the evaluation after each round (default: eval_fraction of "
                           "the prompts, never trained on).", text=True, path=True, check=paths(allow_empty=False))
    eval_fraction: float = _f(0.1, "Share of the prompts held out for the evaluation when eval_prompts is not given.",
                              range="[0, 1)")
    good_score: float | None = _f(None, "A judged score at or above this counts as a good answer: the table then "
                                  "shows the good share (pointwise judges; default: the mean score only).",
                                  may_change=True)
    stop_when_no_gain: bool = _f(False, "Stop after a round whose win rate over the previous round has a 95-percent "
                                 "interval that includes 0.5 (no measurable gain).", may_change=True)
    on_collapse: str = _f("rollback", "A round that collapsed (see the README): rollback (keep the previous "
                          "round's model as the result and stop) or warn (say so and go on).",
                          choices=("rollback", "warn"), may_change=True)
    collapse_kl: float = _f(2.0, "KL to the round's starting model, in nats per token, above which the KL "
                            "counts as having jumped (one of the collapse signals).", range="(0, inf)",
                            may_change=True)
    resume: bool = _f(False, "Continue a run in output_dir at the round and phase where it stopped.",
                      may_change=True)

    def __post_init__(self) -> None:
        validate(self)
        need(bool(self.model), "no model given; pass --model PATH (the first model, usually the SFT model).")
        need(bool(self.prompts), "no prompts given; pass --prompts FILE.")
        need(bool(self.output_dir), "no output folder given; pass --output-dir DIR.")
        need(self.eval_prompts is not None or self.eval_fraction > 0,
             "the evaluation after each round needs held-out prompts; pass --eval-prompts FILE or an "
             "--eval-fraction above 0.")
        need(not (self.lora and not self.merge_lora),
             "each round starts from the previous round's model, so a LoRA run needs --merge-lora true (its final/ "
             "is then a whole model).")
        need(not (self.reference_mode == "fixed" and self.reference == "lora_disabled"),
             "reference 'lora_disabled' is the round's starting model, which --reference-mode fixed replaces by the "
             "first model; use --reference auto.")
        # The rules between pairs' options and between train's (judge given, lengths, reference and loss...)
        self.pairs_config(self.model, "prompts.jsonl", "pairs.jsonl", seed=self.seed)
        self.train_config(self.model, "pairs.jsonl", "train", reference_model=None)

    def pairs_config(self, model: str, prompts: str, output: str, *, seed: int, **changes: Any) -> PairsConfig:
        """A round's `pairs` options (its prompts are a file iterate wrote, with a "prompt" field)."""
        values = {theirs: getattr(self, mine) for mine, theirs in PAIRS_NAMES.items()}
        return PairsConfig(**{**values, "model": model, "prompts": prompts, "output": output, "seed": seed,
                              "prompt_field": "prompt", **changes})

    def train_config(self, model: str, data: str, output_dir: str, *, reference_model: str | None,
                     **changes: Any) -> TrainConfig:
        """A round's `train` options (resumed when its folder has a checkpoint)."""
        values = {name: getattr(self, name) for name in TRAIN_NAMES}
        return TrainConfig(**{**values, "model": model, "data": data, "output_dir": output_dir,
                              "reference_model": reference_model, "resume": "auto", **changes})

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "config") -> IterateConfig:
        check_keys(cls, values, where, command="iterate")
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> IterateConfig:
        values = read_yaml(path, cls)
        values.update(overrides or {})
        return cls.from_dict(values, where=str(path))
