"""Preference losses: small pure functions over per-pair statistics.

Every code path (the plain training loop, the prefix-shared forward, the chunked forward, the
distributed runner) reduces a batch to the same per-pair statistics and calls `preference_loss`,
so each formula exists exactly once, here.

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
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from preftune.errors import PreftuneError

__all__ = [
    "LOSS_TYPES",
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

LOSS_TYPES: tuple[str, ...] = (
    "sigmoid",
    "robust",
    "ipo",
    "hinge",
    "sigmoid_norm",
    "simpo",
    "apo_zero",
    "apo_down",
    "nca_pair",
    "bco_pair",
    "dpop",
)
"""Every loss name `LossConfig.loss_types` accepts (the SFT term is `LossConfig.sft_weight`)."""

REFERENCE_FREE: frozenset[str] = frozenset({"simpo"})
"""Losses that never look at the reference model's log-probabilities."""

LABEL_SMOOTHING_LOSSES: frozenset[str] = frozenset({"sigmoid", "robust", "sigmoid_norm", "simpo"})
"""Losses whose formula has a label-smoothing (flip probability) term ε."""


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _smoothed_neg_logsigmoid(logits: Tensor, label_smoothing: float) -> Tensor:
    """-(1-ε)·logσ(z) - ε·logσ(-z): the binary cross-entropy of logit z against soft label 1-ε.

    Shared by sigmoid, sigmoid_norm and simpo so the smoothing form is written once.
    Shapes: logits [B] -> [B].
    """
    loss = -F.logsigmoid(logits)
    if label_smoothing != 0.0:
        # Written as (1-ε)·a + ε·b rather than a + ε·(b-a) to keep the textbook form exact at ε=0.
        loss = (1.0 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-logits)
    return loss


def _per_token(logps: Tensor, lengths: Tensor) -> Tensor:
    """logps / lengths, with lengths clamped at 1 so an empty completion gives 0, not NaN."""
    return logps / lengths.clamp_min(1.0)


# ---------------------------------------------------------------------------------------------
# One function per formula
# ---------------------------------------------------------------------------------------------


def sigmoid_loss(
    chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float, label_smoothing: float = 0.0
) -> Tensor:
    """DPO loss with optional conservative label smoothing (cDPO).

    loss = -(1-ε)·logσ(β·h) - ε·logσ(-β·h),  h = chosen_logratios - rejected_logratios.

    Paper: Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly
    a Reward Model", arXiv:2305.18290. ε > 0 is conservative DPO (Mitchell 2023, "A note on DPO
    with noisy preferences & relationship to IPO"): the preference label is flipped with prob. ε.
    Shapes: [B], [B] -> [B].
    """
    h = chosen_logratios - rejected_logratios
    return _smoothed_neg_logsigmoid(beta * h, label_smoothing)


def robust_loss(
    chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float, label_smoothing: float = 0.0
) -> Tensor:
    """Robust DPO (rDPO): an unbiased DPO loss under label noise of rate ε.

    loss = [-(1-ε)·logσ(β·h) + ε·logσ(-β·h)] / (1 - 2ε),  h = chosen_logratios - rejected_logratios.

    Paper: Chowdhury et al. 2024, "Provably Robust DPO: Aligning Language Models with Noisy
    Feedback", arXiv:2403.00409. Requires 0 <= ε < 0.5. At ε = 0 this is plain DPO.
    Shapes: [B], [B] -> [B].
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"robust_loss needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
    logits = beta * (chosen_logratios - rejected_logratios)
    loss = -(1.0 - label_smoothing) * F.logsigmoid(logits) + label_smoothing * F.logsigmoid(-logits)
    return loss / (1.0 - 2.0 * label_smoothing)


def ipo_loss(
    chosen_logratios: Tensor,
    rejected_logratios: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    beta: float,
) -> Tensor:
    """IPO loss, length-normalised as TRL does.

    h_norm = chosen_logratios/|c| - rejected_logratios/|r|;  loss = (h_norm - 1/(2β))².

    Paper: Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
    Preferences", arXiv:2310.12036 (here β plays the role of the paper's τ).
    Shapes: four [B] tensors -> [B].
    """
    h_norm = _per_token(chosen_logratios, chosen_lengths) - _per_token(rejected_logratios, rejected_lengths)
    return (h_norm - 1.0 / (2.0 * beta)) ** 2


def hinge_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float) -> Tensor:
    """Hinge loss of RSO (SLiC-style hinge on the DPO logit).

    loss = relu(1 - β·h),  h = chosen_logratios - rejected_logratios.

    Paper: Liu et al. 2023, "Statistical Rejection Sampling Improves Preference Optimization",
    arXiv:2309.06657. Shapes: [B], [B] -> [B].
    """
    return torch.relu(1.0 - beta * (chosen_logratios - rejected_logratios))


def sigmoid_norm_loss(
    chosen_logratios: Tensor,
    rejected_logratios: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> Tensor:
    """Length-normalised DPO: DPO on per-token log-ratios.

    h_norm = chosen_logratios/|c| - rejected_logratios/|r|;
    loss = -(1-ε)·logσ(β·h_norm) - ε·logσ(-β·h_norm).

    Same objective as DPO (Rafailov et al. 2023, arXiv:2305.18290) with the length normalisation
    of IPO/SimPO, which removes DPO's bias towards longer chosen responses.
    Shapes: four [B] tensors -> [B].
    """
    h_norm = _per_token(chosen_logratios, chosen_lengths) - _per_token(rejected_logratios, rejected_lengths)
    return _smoothed_neg_logsigmoid(beta * h_norm, label_smoothing)


def simpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    beta: float,
    gamma: float,
    label_smoothing: float = 0.0,
) -> Tensor:
    """SimPO: reference-free, length-normalised margin loss.

    z = β·(pc/|c| - pr/|r|) - γ;  loss = -(1-ε)·logσ(z) - ε·logσ(-z).

    Paper: Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free
    Reward", arXiv:2405.14734. γ is the absolute target reward margin (not γ/β).
    Shapes: four [B] tensors -> [B].
    """
    margin = _per_token(policy_chosen_logps, chosen_lengths) - _per_token(
        policy_rejected_logps, rejected_lengths
    )
    return _smoothed_neg_logsigmoid(beta * margin - gamma, label_smoothing)


def apo_zero_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float) -> Tensor:
    """APO-zero: push chosen likelihood up and rejected likelihood down, each against the anchor.

    loss = 1 - σ(β·chosen_logratios) + σ(β·rejected_logratios).

    Paper: D'Oosterlinck et al. 2024, "Anchored Preference Optimization and Contrastive
    Revisions", arXiv:2408.06266. Use when chosen outputs are better than the model's own.
    Shapes: [B], [B] -> [B].
    """
    return 1.0 - torch.sigmoid(beta * chosen_logratios) + torch.sigmoid(beta * rejected_logratios)


def apo_down_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float) -> Tensor:
    """APO-down: push chosen likelihood down while keeping the chosen-over-rejected margin.

    loss = σ(β·chosen_logratios) + 1 - σ(β·h),  h = chosen_logratios - rejected_logratios.

    Paper: D'Oosterlinck et al. 2024, "Anchored Preference Optimization and Contrastive
    Revisions", arXiv:2408.06266. Use when the model's outputs are better than the chosen ones.
    Shapes: [B], [B] -> [B].
    """
    return (
        torch.sigmoid(beta * chosen_logratios)
        + 1.0
        - torch.sigmoid(beta * (chosen_logratios - rejected_logratios))
    )


def nca_pair_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float) -> Tensor:
    """NCA (pairwise form): absolute-likelihood contrastive loss.

    loss = -logσ(β·chosen_logratios) - ½·logσ(-β·chosen_logratios) - ½·logσ(-β·rejected_logratios).

    Paper: Chen et al. 2024, "Noise Contrastive Alignment of Language Models with Explicit
    Rewards", arXiv:2402.05369. Shapes: [B], [B] -> [B].
    """
    r_c = beta * chosen_logratios
    r_r = beta * rejected_logratios
    return -F.logsigmoid(r_c) - 0.5 * F.logsigmoid(-r_c) - 0.5 * F.logsigmoid(-r_r)


def bco_pair_loss(
    chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float, reward_shift: float = 0.0
) -> Tensor:
    """BCO (paired form): binary classification of chosen vs rejected rewards around a shift δ.

    r_c = β·chosen_logratios, r_r = β·rejected_logratios;
    loss = -logσ(r_c - δ) - logσ(-(r_r - δ)).

    Paper: Jung et al. 2024, "Binary Classifier Optimization for Large Language Model
    Alignment", arXiv:2404.04656. δ is the running mean of past rewards (see `RewardShift`);
    it is passed in so this function stays pure. Shapes: [B], [B] -> [B].
    """
    r_c = beta * chosen_logratios
    r_r = beta * rejected_logratios
    return -F.logsigmoid(r_c - reward_shift) - F.logsigmoid(-(r_r - reward_shift))


def dpop_loss(
    chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float, dpop_lambda: float = 50.0
) -> Tensor:
    """DPO-Positive (DPOP): DPO plus a penalty when the chosen likelihood falls below the reference.

    loss = -logσ(β·(h - λ·max(0, reference_chosen_logps - policy_chosen_logps)))
         = -logσ(β·(h - λ·max(0, -chosen_logratios))).

    Paper: Pal et al. 2024, "Smaug: Fixing Failure Modes of Preference Optimisation with
    DPO-Positive", arXiv:2402.13228. Shapes: [B], [B] -> [B].
    """
    penalty = torch.clamp_min(-chosen_logratios, 0.0)
    return -F.logsigmoid(beta * (chosen_logratios - rejected_logratios - dpop_lambda * penalty))


def sft_loss(policy_chosen_logps: Tensor, chosen_lengths: Tensor) -> Tensor:
    """Per-pair SFT term: per-token NLL of the chosen response.

    loss = -policy_chosen_logps / |c|.

    Added with weight α (`LossConfig.sft_weight`) as in RPO: Pang et al. 2024, "Iterative
    Reasoning Preference Optimization", arXiv:2404.19733. Shapes: [B], [B] -> [B].
    """
    return -_per_token(policy_chosen_logps, chosen_lengths)


def nll_loss(logps: Tensor, lengths: Tensor) -> Tensor:
    """Token-level mean NLL for the SFT task: -sum(logps) / sum(lengths).

    Every token in the batch weighs the same (unlike the mean of per-sequence means).
    Shapes: logps [N] summed log-probs per sequence, lengths [N] token counts -> scalar [].
    """
    return -logps.sum() / lengths.sum().clamp_min(1.0)


# ---------------------------------------------------------------------------------------------
# BCO running reward shift (the only state in this module)
# ---------------------------------------------------------------------------------------------


class RewardShift:
    """Running mean δ of all BCO rewards (r_c and r_r) seen so far.

    Kept as an exact float64 sum and an integer count, so `value` equals the plain mean over
    every element ever passed to `update` (up to float64 summation order) and a run resumed from
    `state_dict()` continues bit-for-bit. Call `update` after each optimiser step with the step's
    detached rewards; in distributed training pass rewards gathered from all ranks so every rank
    holds the same δ. Before the first update δ = 0.
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
            if flat.numel() == 0:
                continue
            self._sum += float(flat.to(torch.float64).sum().item())
            self._count += int(flat.numel())

    def state_dict(self) -> dict[str, Any]:
        return {"sum": self._sum, "count": self._count}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._sum = float(state["sum"])
        self._count = int(state["count"])

    def __repr__(self) -> str:
        return f"RewardShift(value={self.value:.6g}, count={self._count})"


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
class LossConfig:
    """Which preference losses to use and their hyperparameters.

    Several `loss_types` are combined as a weighted sum (MPO-style), plus `sft_weight` times the
    per-token NLL of the chosen response (RPO). Invalid settings raise `PreftuneError`.
    """

    loss_types: tuple[str, ...] = ("sigmoid",)
    loss_weights: tuple[float, ...] | None = None
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    dpop_lambda: float = 50.0
    sft_weight: float = 0.0

    def __post_init__(self) -> None:
        # Config files give lists (or a bare string); normalise so the frozen config is hashable.
        types = self.loss_types
        if isinstance(types, str):
            types = (types,)
        types = tuple(str(t).strip() for t in types)
        object.__setattr__(self, "loss_types", types)
        if not types:
            raise PreftuneError(
                f"loss_types is empty; name at least one loss, e.g. ['sigmoid'] (choices: {', '.join(LOSS_TYPES)})."
            )
        for name in types:
            if name == "sft":
                raise PreftuneError(
                    "'sft' is not a loss type; set sft_weight (e.g. 1.0) to add the SFT term to the preference loss."
                )
            if name not in LOSS_TYPES:
                close = difflib.get_close_matches(name, LOSS_TYPES, n=1)
                hint = f"did you mean '{close[0]}'? " if close else ""
                raise PreftuneError(
                    f"Unknown loss type '{name}'; {hint}valid loss types are: {', '.join(LOSS_TYPES)}."
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

        beta = _finite("beta", self.beta)
        if beta <= 0:
            raise PreftuneError(
                f"beta must be > 0, got {beta}: it is the strength of the KL anchor to the reference "
                "(larger beta keeps the policy closer to the reference); 0.1 is the usual default."
            )
        object.__setattr__(self, "beta", beta)

        eps = _finite("label_smoothing", self.label_smoothing)
        if not 0.0 <= eps < 0.5:
            raise PreftuneError(
                f"label_smoothing must be in [0, 0.5), got {eps}: it is the assumed probability that a "
                "preference label is flipped (0 disables it; 0.1 is a typical value)."
            )
        if eps > 0:
            unused = [t for t in types if t not in LABEL_SMOOTHING_LOSSES]
            if unused:
                raise PreftuneError(
                    f"label_smoothing={eps} has no effect on loss type(s) {', '.join(unused)}; set it to 0 or use "
                    f"only losses that support it ({', '.join(sorted(LABEL_SMOOTHING_LOSSES))})."
                )
        object.__setattr__(self, "label_smoothing", eps)

        object.__setattr__(self, "simpo_gamma", _finite("simpo_gamma", self.simpo_gamma))
        dpop_lambda = _finite("dpop_lambda", self.dpop_lambda)
        if dpop_lambda < 0:
            raise PreftuneError(f"dpop_lambda must be >= 0 (50 is the paper's default), got {dpop_lambda}.")
        object.__setattr__(self, "dpop_lambda", dpop_lambda)
        sft_weight = _finite("sft_weight", self.sft_weight)
        if sft_weight < 0:
            raise PreftuneError(f"sft_weight must be >= 0 (0 disables the SFT term), got {sft_weight}.")
        object.__setattr__(self, "sft_weight", sft_weight)

    @property
    def needs_reference(self) -> bool:
        """False only when every loss type is reference-free (then no reference model is loaded)."""
        return not all(t in REFERENCE_FREE for t in self.loss_types)

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
    beta, eps = config.beta, config.label_smoothing

    if config.needs_reference:
        assert reference_chosen_logps is not None and reference_rejected_logps is not None
        chosen_logratios = pc - _as_float(reference_chosen_logps)
        rejected_logratios = pr - _as_float(reference_rejected_logps)
    else:
        chosen_logratios = rejected_logratios = None

    total: Tensor | None = None
    for loss_type, weight in zip(config.loss_types, config.weights):
        if loss_type == "simpo":
            term = simpo_loss(pc, pr, lc, lr, beta, config.simpo_gamma, eps)
        else:
            assert chosen_logratios is not None and rejected_logratios is not None
            if loss_type == "sigmoid":
                term = sigmoid_loss(chosen_logratios, rejected_logratios, beta, eps)
            elif loss_type == "robust":
                term = robust_loss(chosen_logratios, rejected_logratios, beta, eps)
            elif loss_type == "ipo":
                term = ipo_loss(chosen_logratios, rejected_logratios, lc, lr, beta)
            elif loss_type == "hinge":
                term = hinge_loss(chosen_logratios, rejected_logratios, beta)
            elif loss_type == "sigmoid_norm":
                term = sigmoid_norm_loss(chosen_logratios, rejected_logratios, lc, lr, beta, eps)
            elif loss_type == "apo_zero":
                term = apo_zero_loss(chosen_logratios, rejected_logratios, beta)
            elif loss_type == "apo_down":
                term = apo_down_loss(chosen_logratios, rejected_logratios, beta)
            elif loss_type == "nca_pair":
                term = nca_pair_loss(chosen_logratios, rejected_logratios, beta)
            elif loss_type == "bco_pair":
                term = bco_pair_loss(chosen_logratios, rejected_logratios, beta, reward_shift)
            elif loss_type == "dpop":
                term = dpop_loss(chosen_logratios, rejected_logratios, beta, config.dpop_lambda)
            else:  # pragma: no cover - LossConfig validates names
                raise AssertionError(f"unhandled loss type {loss_type!r}")
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
            chosen_rewards = beta * _per_token(pc.detach(), lc)
            rejected_rewards = beta * _per_token(pr.detach(), lr)
    return LossOutput(losses=total, chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
