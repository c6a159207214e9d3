"""Preference losses: a registry of small pure functions over per-pair statistics (formulas.py), and the dispatch.

Every forward path (plain, prefix-shared, packed, chunked; one process or many) reduces a batch to the
same per-pair statistics and calls `preference_loss`, so each formula exists exactly once, in formulas.py.

Adding a loss is one function (the formula, with paper and shapes in its docstring) plus one `register`
call that says which statistics it reads and what it needs (a reference, lengths, label smoothing, the
BCO reward shift); config validation, `needs_reference` and the dispatch all read the registry.

Inputs (all float tensors of shape [B], B = number of preference pairs):

* ``policy_chosen_logps``, ``policy_rejected_logps``: log-probabilities of the completion tokens
  given the prompt under the policy, SUMMED over the completion tokens.
* ``reference_chosen_logps``, ``reference_rejected_logps``: the same under the frozen reference.
* ``chosen_lengths``, ``rejected_lengths``: completion token counts (float).

Derived quantities used in the docstrings below::

    chosen_logratios   = policy_chosen_logps   - reference_chosen_logps      # log pi/pi_ref (chosen)
    rejected_logratios = policy_rejected_logps - reference_rejected_logps    # log pi/pi_ref (rejected)
    h                  = chosen_logratios - rejected_logratios
    h_norm             = chosen_logratios / |c| - rejected_logratios / |r|   # per-token version

About beta (β): DPO is the closed-form solution of reward maximisation under a KL penalty
β·KL(π || π_ref), so β is the strength of the KL anchor to the reference model. A LARGER β keeps
the policy CLOSER to the reference (the implicit reward β·log π/π_ref saturates the sigmoid after
a smaller move away from π_ref); a smaller β lets it move further. 0.1 is the common default.
For reference-free SimPO β instead scales the length-normalised log-likelihood margin (the paper
uses values around 2-10).

Each loss function returns a per-pair loss of shape [B]; the caller takes the mean (or a
token-weighted reduction of its choosing). Implicit rewards for logging are returned detached.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from preftune.errors import PreftuneError
from preftune.losses.formulas import (
    apo_down_loss,
    apo_zero_loss,
    bco_pair_loss,
    dpop_loss,
    hinge_loss,
    ipo_loss,
    nca_pair_loss,
    nll_loss,
    per_token,
    robust_loss,
    sft_loss,
    sigmoid_loss,
    sigmoid_norm_loss,
    simpo_loss,
)
from preftune.options import LOSS_OPTIONS, include_options, validate

__all__ = [
    "LOSSES",
    "LOSS_TYPES",
    "LossSpec",
    "PairStats",
    "register",
    "REFERENCE_FREE",
    "LABEL_SMOOTHING_LOSSES",
    "LossConfig",
    "LossOutput",
    "RewardShift",
    "preference_loss",
    "sigmoid_loss",
    "robust_loss",
    "ipo_loss",
    "hinge_loss",
    "sigmoid_norm_loss",
    "simpo_loss",
    "apo_zero_loss",
    "apo_down_loss",
    "nca_pair_loss",
    "bco_pair_loss",
    "dpop_loss",
    "sft_loss",
    "nll_loss",
]


# ---------------------------------------------------------------------------------------------
# BCO running reward shift (the only state in this module)
# ---------------------------------------------------------------------------------------------


class RewardShift:
    """Running mean δ of all BCO rewards (r_c and r_r) seen so far.

    Kept as an exact float64 sum and an integer count, so `value` equals the plain mean over
    every element ever passed to `update` (up to float64 summation order) and a run resumed from
    `state_dict()` continues bit-for-bit. Call `update` after each optimiser step with the step's
    detached rewards (or `add` their sum and count, summed over all processes, so every process
    holds the same δ). Before the first update δ = 0.
    """

    def __init__(self) -> None:
        self._sum = 0.0
        self._count = 0

    @property
    def value(self) -> float:
        return self._sum / self._count if self._count else 0.0

    @property
    def count(self) -> int:
        return self._count

    def update(self, chosen_rewards: Tensor, rejected_rewards: Tensor) -> None:
        """Fold one step's rewards (any shape, usually [B] each) into the running mean."""
        for rewards in (chosen_rewards, rejected_rewards):
            flat = rewards.detach().reshape(-1)
            self.add(float(flat.to(torch.float64).sum().item()), int(flat.numel()))

    def add(self, total: float, count: int) -> None:
        """Fold a sum of `count` rewards into the running mean (a step's rewards summed over processes)."""
        self._sum += total
        self._count += count

    def state_dict(self) -> dict[str, Any]:
        return {"sum": self._sum, "count": self._count}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._sum = float(state["sum"])
        self._count = int(state["count"])

    def __repr__(self) -> str:
        return f"RewardShift(value={self.value:.6g}, count={self._count})"


# ---------------------------------------------------------------------------------------------
# Registry: name -> formula adapter + properties
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairStats:
    """The per-pair statistics every loss is a function of; all [B] float tensors.

    ``chosen_logratios``/``rejected_logratios`` are None for a reference-free configuration.
    ``reward_shift`` is BCO's running δ (a float), 0 until the first optimizer step.
    """

    policy_chosen_logps: Tensor
    policy_rejected_logps: Tensor
    chosen_logratios: Tensor | None
    rejected_logratios: Tensor | None
    chosen_lengths: Tensor
    rejected_lengths: Tensor
    reward_shift: float = 0.0


@dataclass(frozen=True)
class LossSpec:
    """A registered loss: ``compute(stats, config) -> [B]`` and the properties the rest of the code asks about."""

    name: str
    compute: Callable[[PairStats, LossConfig], Tensor]
    reference_free: bool = False  # never reads the reference log-probs (no reference model is loaded)
    label_smoothing: bool = False  # has an ε (flip probability) term
    uses_lengths: bool = False  # reads the answers' token counts
    uses_reward_shift: bool = False  # reads BCO's running reward mean, which the objective updates per step


LOSSES: dict[str, LossSpec] = {}


def register(name: str, compute: Callable[[PairStats, LossConfig], Tensor], **properties: bool) -> LossSpec:
    """Add a loss to the registry under `name` (see `LossSpec` for the properties)."""
    if name in LOSSES:
        raise ValueError(f"loss {name!r} is already registered")
    LOSSES[name] = spec = LossSpec(name, compute, **properties)
    return spec


# The adapters below only pick the statistics each formula reads.
register("sigmoid", lambda s, c: sigmoid_loss(s.chosen_logratios, s.rejected_logratios, c.beta, c.label_smoothing),
         label_smoothing=True)
register("robust", lambda s, c: robust_loss(s.chosen_logratios, s.rejected_logratios, c.beta, c.label_smoothing),
         label_smoothing=True)
register("ipo", lambda s, c: ipo_loss(s.chosen_logratios, s.rejected_logratios, s.chosen_lengths,
                                      s.rejected_lengths, c.beta), uses_lengths=True)
register("hinge", lambda s, c: hinge_loss(s.chosen_logratios, s.rejected_logratios, c.beta))
register("sigmoid_norm", lambda s, c: sigmoid_norm_loss(s.chosen_logratios, s.rejected_logratios, s.chosen_lengths,
                                                        s.rejected_lengths, c.beta, c.label_smoothing),
         label_smoothing=True, uses_lengths=True)
register("simpo", lambda s, c: simpo_loss(s.policy_chosen_logps, s.policy_rejected_logps, s.chosen_lengths,
                                          s.rejected_lengths, c.beta, c.simpo_gamma, c.label_smoothing),
         reference_free=True, label_smoothing=True, uses_lengths=True)
register("apo_zero", lambda s, c: apo_zero_loss(s.chosen_logratios, s.rejected_logratios, c.beta))
register("apo_down", lambda s, c: apo_down_loss(s.chosen_logratios, s.rejected_logratios, c.beta))
register("nca_pair", lambda s, c: nca_pair_loss(s.chosen_logratios, s.rejected_logratios, c.beta))
register("bco_pair", lambda s, c: bco_pair_loss(s.chosen_logratios, s.rejected_logratios, c.beta, s.reward_shift),
         uses_reward_shift=True)
register("dpop", lambda s, c: dpop_loss(s.chosen_logratios, s.rejected_logratios, c.beta, c.dpop_lambda))

LOSS_TYPES: tuple[str, ...] = tuple(LOSSES)
"""Every loss name `LossConfig.loss_types` accepts (the SFT term is `LossConfig.sft_weight`)."""

REFERENCE_FREE: frozenset[str] = frozenset(n for n, spec in LOSSES.items() if spec.reference_free)
"""Losses that never look at the reference model's log-probabilities."""

LABEL_SMOOTHING_LOSSES: frozenset[str] = frozenset(n for n, spec in LOSSES.items() if spec.label_smoothing)
"""Losses whose formula has a label-smoothing (flip probability) term ε."""


# ---------------------------------------------------------------------------------------------
# Configuration and dispatch
# ---------------------------------------------------------------------------------------------


def _finite(name: str, value: float) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise PreftuneError(f"{name} must be a number, got {value!r}.") from None
    if not math.isfinite(value):
        raise PreftuneError(f"{name} must be a finite number, got {value!r}.")
    return value


@dataclass(frozen=True)
@include_options(LOSS_OPTIONS)
class LossConfig:
    """Which preference losses to use and their hyperparameters.

    Several `loss_types` are combined as a weighted sum (MPO-style), plus `sft_weight` times the
    per-token NLL of the chosen response (RPO). The hyperparameters (beta, label_smoothing, simpo_gamma,
    dpop_lambda, sft_weight, ...) are the loss options of the schema, `preftune.options.LOSS_OPTIONS`, with
    their defaults and ranges; `TrainConfig.loss_config()` hands over the run's. Invalid settings raise
    `PreftuneError`.
    """

    loss_types: tuple[str, ...] = ("sigmoid",)
    loss_weights: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        # Config files give lists (or a bare string); normalise so the frozen config is hashable.
        types = self.loss_types
        if isinstance(types, str):
            types = (types,)
        types = tuple(str(t).strip() for t in types)
        object.__setattr__(self, "loss_types", types)
        if not types:
            raise PreftuneError(
                f"loss_types is empty; name at least one loss, e.g. ['sigmoid'] (choices: {', '.join(LOSSES)})."
            )
        for name in types:
            if name == "sft":
                raise PreftuneError(
                    "'sft' is not a loss type; set sft_weight (e.g. 1.0) to add the SFT term to the preference loss."
                )
            if name not in LOSSES:
                close = difflib.get_close_matches(name, list(LOSSES), n=1)
                hint = f"did you mean '{close[0]}'? " if close else ""
                raise PreftuneError(
                    f"Unknown loss type '{name}'; {hint}valid loss types are: {', '.join(LOSSES)}."
                )
        dupes = sorted({t for t in types if types.count(t) > 1})
        if dupes:
            raise PreftuneError(
                f"loss type '{dupes[0]}' is listed more than once in loss_types; list it once and use loss_weights."
            )

        if self.loss_weights is not None:
            weights = self.loss_weights
            if isinstance(weights, (int, float)):
                weights = (weights,)
            weights = tuple(_finite("each of loss_weights", w) for w in weights)
            if len(weights) != len(types):
                raise PreftuneError(
                    f"loss_weights has {len(weights)} entries but loss_types has {len(types)}; "
                    "give one weight per loss type (or omit loss_weights for all 1.0)."
                )
            if any(w < 0 for w in weights):
                raise PreftuneError(f"loss_weights must all be >= 0, got {list(weights)}.")
            object.__setattr__(self, "loss_weights", weights)

        # The hyperparameters' types and ranges, as declared once in the schema (already checked when they come
        # from a TrainConfig; a LossConfig built in Python gets the same checks).
        validate(self)
        eps = self.label_smoothing
        if eps > 0:
            unused = [t for t in types if not LOSSES[t].label_smoothing]
            if unused:
                raise PreftuneError(
                    f"label_smoothing={eps} has no effect on loss type(s) {', '.join(unused)}; set it to 0 or use "
                    f"only losses that support it ({', '.join(n for n, spec in LOSSES.items() if spec.label_smoothing)})."
                )

    @property
    def needs_reference(self) -> bool:
        """False only when every loss type is reference-free (then no reference model is loaded)."""
        return not all(LOSSES[t].reference_free for t in self.loss_types)

    @property
    def uses_reward_shift(self) -> bool:
        """Whether a loss reads BCO's running reward mean (the objective then updates it every step)."""
        return any(LOSSES[t].uses_reward_shift for t in self.loss_types)

    @property
    def weights(self) -> tuple[float, ...]:
        """The weight of each loss type (all 1.0 when `loss_weights` is None)."""
        return self.loss_weights if self.loss_weights is not None else (1.0,) * len(self.loss_types)


@dataclass
class LossOutput:
    """Per-pair results of `preference_loss`; shapes [B]. Rewards are detached, for logging only."""

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor


def _as_float(x: Tensor) -> Tensor:
    # bf16/fp16 statistics would lose the small log-ratio differences the losses depend on.
    return x if x.dtype in (torch.float32, torch.float64) else x.to(torch.float32)


def preference_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor | None,
    reference_rejected_logps: Tensor | None,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    config: LossConfig,
    reward_shift: float = 0.0,
) -> LossOutput:
    """Total per-pair loss: Σ_k w_k·loss_k + sft_weight·(-pc/|c|), plus detached implicit rewards.

    All inputs are [B]; `reference_*` may be None only when `config.needs_reference` is False.
    `reward_shift` is the BCO δ (`RewardShift.value`), used only by ``bco_pair``.
    Rewards: β·chosen_logratios and β·rejected_logratios; for a reference-free config
    β·pc/|c| and β·pr/|r| (SimPO's implicit reward).
    Returns `LossOutput` with three [B] tensors (the caller takes the mean of `losses`).
    """
    if config.needs_reference and (reference_chosen_logps is None or reference_rejected_logps is None):
        raise ValueError(
            f"loss types {config.loss_types} need reference_chosen_logps and reference_rejected_logps, got None"
        )
    named = {
        "policy_chosen_logps": policy_chosen_logps,
        "policy_rejected_logps": policy_rejected_logps,
        "reference_chosen_logps": reference_chosen_logps,
        "reference_rejected_logps": reference_rejected_logps,
        "chosen_lengths": chosen_lengths,
        "rejected_lengths": rejected_lengths,
    }
    shape = policy_chosen_logps.shape
    for name, t in named.items():
        if t is not None and (t.dim() != 1 or t.shape != shape):
            raise ValueError(
                f"{name} must have shape [B] = {list(shape)} like policy_chosen_logps, got {list(t.shape)}"
            )

    pc, pr = _as_float(policy_chosen_logps), _as_float(policy_rejected_logps)
    lc, lr = _as_float(chosen_lengths), _as_float(rejected_lengths)
    beta = config.beta

    if config.needs_reference:
        assert reference_chosen_logps is not None and reference_rejected_logps is not None
        chosen_logratios = pc - _as_float(reference_chosen_logps)
        rejected_logratios = pr - _as_float(reference_rejected_logps)
    else:
        chosen_logratios = rejected_logratios = None

    stats = PairStats(pc, pr, chosen_logratios, rejected_logratios, lc, lr, reward_shift)
    total: Tensor | None = None
    for loss_type, weight in zip(config.loss_types, config.weights):
        term = LOSSES[loss_type].compute(stats, config)
        # A weight of exactly 1.0 is skipped so the single-loss path is bit-identical to the formula.
        term = term if weight == 1.0 else weight * term
        total = term if total is None else total + term
    assert total is not None

    if config.sft_weight > 0:
        total = total + config.sft_weight * sft_loss(pc, lc)

    with torch.no_grad():
        if chosen_logratios is not None and rejected_logratios is not None:
            chosen_rewards = beta * chosen_logratios.detach()
            rejected_rewards = beta * rejected_logratios.detach()
        else:
            chosen_rewards = beta * per_token(pc.detach(), lc)
            rejected_rewards = beta * per_token(pr.detach(), lr)
    return LossOutput(losses=total, chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
