"""The option schema (preftune/options.py): each option declared once, and everything that reads options (the
checks of every command, the loss config, the resume check, the flags) reading that declaration."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import pytest

from preftune.command_options import EvalOptions, GenerateOptions, InspectOptions, PlanOptions
from preftune.config import TrainConfig
from preftune.errors import PreftuneError
from preftune.losses import LossConfig
from preftune.options import LOSS_OPTIONS, Option, include_options, may_change, option, options_of, validate


@dataclass
class Toy:
    closed: float = option(0.5, "[0, 1]", range="[0, 1]")
    open_: float = option(0.5, "(0, 1)", range="(0, 1)")
    count: int = option(1, "at least 1", range="[1, inf)")
    small: int = option(0, "capped", range="[0, inf)", int_max=10)
    pick: str = option("a", "one of a, b", choices=("a", "b"))
    maybe: float | None = option(None, "a number or nothing", range="(0, inf)")
    free: Any = option("x", "its own check", check=lambda name, v: v.upper() if isinstance(v, str) else v)

    def __post_init__(self) -> None:
        validate(self)


@pytest.mark.parametrize("kw, message", [
    ({"closed": -0.1}, "closed must be in [0, 1] (got -0.1)."),
    ({"closed": 1.5}, "closed must be in [0, 1] (got 1.5)."),
    ({"open_": 0}, "open_ must be in (0, 1) (got 0)."),
    ({"open_": 1}, "open_ must be in (0, 1) (got 1)."),
    ({"count": 0}, "count must be at least 1 (got 0)."),
    ({"count": 1.5}, "count must be a whole number, got 1.5."),
    ({"count": True}, "count must be a whole number, got True."),
    ({"small": 11}, "small must be at most 10, got 11."),
    ({"pick": "c"}, "pick must be one of a, b; got 'c'."),
    ({"maybe": 0.0}, "maybe must be > 0 (got 0.0)."),
    ({"maybe": "x"}, "maybe must be a number, got 'x'."),
    ({"closed": float("inf")}, "closed must be a finite number, got inf."),
])
def test_ranges_are_open_or_closed_at_each_end(kw, message):
    with pytest.raises(PreftuneError) as e:
        Toy(**kw)
    assert str(e.value) == message


def test_ends_that_are_in_the_range_and_normalised_values():
    """Closed ends are allowed; numbers written as text (YAML's `1e-3`) become numbers of the option's type;
    an int given for a float option is kept as a float; None where allowed; the option's own check runs."""
    t = Toy(closed=1, open_="1e-3", count="7", small=10, maybe=None, free="q")
    assert (t.closed, t.open_, t.count, t.small, t.maybe, t.free) == (1.0, 0.001, 7, 10, None, "Q")
    assert type(t.closed) is float and type(t.count) is int


def test_loss_options_flow_into_train_config_and_loss_config():
    """A loss hyper-parameter is one entry of LOSS_OPTIONS: TrainConfig holds it right after loss_weights (the
    YAML keys keep their order), LossConfig holds it with the same default, and loss_config() hands it over."""
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    at = names.index("loss_weights") + 1
    assert names[at:at + len(LOSS_OPTIONS)] == list(LOSS_OPTIONS)
    assert [f.name for f in dataclasses.fields(LossConfig)] == ["loss_types", "loss_weights", *LOSS_OPTIONS]
    assert LossConfig() == TrainConfig().loss_config()
    # another valid value of each: a second choice, else twice the default (halved where that leaves the range)
    special = {"label_smoothing": 0.2, "f_alpha_divergence_coef": 0.25, "use_weighting": True, "ld_alpha": 0.5,
               "sync_ref_model": True, "ref_model_mixup_alpha": 0.3}
    changed = {name: special[name] if name in special else opt.choices[1] if opt.choices else opt.default * 2
               for name, opt in LOSS_OPTIONS.items()}
    lc = TrainConfig(**changed).loss_config()
    assert {name: getattr(lc, name) for name in LOSS_OPTIONS} == changed


def test_include_options_places_the_fields():
    @dataclass
    @include_options({"b": Option(2.0, "b"), "c": Option(None, "c", kind="str | None")}, after="a")
    class C:
        a: int = option(1, "a")
        d: int = option(4, "d")

    assert [(n, kind) for n, kind, _ in options_of(C)] == [("a", "int"), ("b", "float"), ("c", "str | None"),
                                                           ("d", "int")]


def test_shared_options_are_checked_alike_in_every_command():
    """batch_size, max_length, seed ... are declared once: each command refuses the same bad value the same
    way, with its own default."""
    commands = {TrainConfig: {}, InspectOptions: {"data": "d"}, EvalOptions: {"model": "m", "data": ["d"]},
                GenerateOptions: {"model": "m", "prompt": ["p"]}, PlanOptions: {"model": "m"}}
    for cls, needed in commands.items():
        with pytest.raises(PreftuneError, match=r"^batch_size must be at least 1 \(got 0\)\.$"):
            cls(**needed, batch_size=0)
    for cls in (TrainConfig, EvalOptions, GenerateOptions):
        with pytest.raises(PreftuneError, match="^seed must be at most 4294967295"):
            cls(**commands[cls], seed=2**32)
        with pytest.raises(PreftuneError, match="^dtype must be one of float32, bfloat16, float16"):
            cls(**commands[cls], dtype="float64")
    assert (TrainConfig().seed, EvalOptions(**commands[EvalOptions]).seed) == (42, 0)
    assert (TrainConfig().batch_size, PlanOptions(model="m").batch_size) == (8, 4)


def test_every_option_is_declared_with_help():
    for cls in (TrainConfig, InspectOptions, EvalOptions, GenerateOptions, PlanOptions):
        fields = dataclasses.fields(cls)
        assert len(options_of(cls)) == len(fields)
        assert all(opt.help.strip() for _, _, opt in options_of(cls))


def test_what_a_resume_may_change_is_read_from_the_options():
    """The settings that never change what the steps already taken mean (outputs/identity.py compares the rest)."""
    assert may_change(TrainConfig) == {
        "max_steps", "num_epochs", "save_steps", "save_total_limit", "logging_steps", "eval_steps",
        "eval_batch_size", "eval_data", "eval_split", "progress", "resume", "resume_force", "overwrite", "output_dir", "model",
        "data", "reference_model", "skip_invalid", "trust_remote_code", "allow_pickle", "attn_implementation",
        "gradient_checkpointing", "prefix_sharing", "logits_chunk_size", "on_nonfinite", "merge_lora",
        "data_cache_dir", "report_to", "push_to_hub", "hub_private", "batch_size", "gradient_accumulation_steps",
        # online DPO: its prompts (compared by token ids) and how its judge is called, not which judge it is
        "prompts", "judge_timeout", "judge_retries", "judge_backoff", "judge_concurrency", "judge_batch_size",
        "judge_api_key_env"}
