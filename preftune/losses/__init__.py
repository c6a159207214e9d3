"""Preference losses: a registry of small pure functions over per-pair statistics (formulas.py), and the dispatch.

Every forward path (plain, prefix-shared, packed, chunked; one process or many) reduces a batch to the
same per-pair statistics and calls `preference_loss`, so each formula exists exactly once, in formulas.py.

Adding a loss is one function in formulas.py (the formula, with paper and shapes in its docstring) plus one
`register` call in registry.py that says which statistics it reads and what it needs (a reference, lengths,
label smoothing, the BCO reward shift, f-divergence support); config validation, `needs_reference` and the
dispatch all read the registry. transforms.py holds what changes the statistics before a loss reads them
(f-DPO's scores, LD-DPO's desensitised log-probs, WPO's weights), unpaired.py the formulas over unpaired examples
(KTO, APO-zero's unpaired form) with KTO's reference point.

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
uses values around 2-10); for CPO it scales the summed log-likelihood margin; for ORPO it is the paper's λ,
the weight of the odds-ratio term against the NLL term (TRL's ORPOConfig.beta is λ too; 0.1 there).

Each loss function returns a per-pair loss of shape [B]; the caller takes the mean (or a
token-weighted reduction of its choosing). Implicit rewards for logging are returned detached.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from preftune.errors import PreftuneError
from preftune.losses.formulas import (
    aot_loss,
    aot_unpaired_loss,
    apo_down_loss,
    apo_zero_loss,
    bco_pair_loss,
    cpo_loss,
    discopop_loss,
    dpop_loss,
    exo_pair_loss,
    hinge_loss,
    ipo_loss,
    nca_pair_loss,
    odds_ratio_loss,
    orpo_loss,
    per_token,
    robust_loss,
    sft_loss,
    sigmoid_loss,
    sigmoid_norm_loss,
    simpo_loss,
    sppo_hard_loss,
)
from preftune.losses.registry import LOSSES, LossSpec, PairStats, register
from preftune.losses.shift import RewardShift
from preftune.losses.transforms import F_DIVERGENCES, f_divergence_scores, ld_logps, wpo_weights
from preftune.losses.unpaired import ExampleStats, apo_zero_unpaired_loss, kto_loss, kto_reference_point
from preftune.options import LOSS_OPTIONS, include_options, need, validate

__all__ = [
    "LOSSES", "LOSS_TYPES", "LossSpec", "PairStats", "register", "REFERENCE_FREE",
    "F_DIVERGENCES", "LossConfig", "LossOutput", "RewardShift", "preference_loss",
    "sigmoid_loss", "robust_loss", "ipo_loss", "hinge_loss", "sigmoid_norm_loss", "simpo_loss", "apo_zero_loss",
    "apo_down_loss", "nca_pair_loss", "bco_pair_loss", "dpop_loss", "exo_pair_loss", "sppo_hard_loss", "aot_loss",
    "aot_unpaired_loss", "discopop_loss", "odds_ratio_loss", "orpo_loss", "cpo_loss", "f_divergence_scores",
    "sft_loss", "ExampleStats", "kto_loss", "apo_zero_unpaired_loss", "kto_reference_point",
    "unpaired_loss",
]

LOSS_TYPES: tuple[str, ...] = tuple(LOSSES)
"""Every loss name `LossConfig.loss_types` accepts (the SFT term is `LossConfig.sft_weight`)."""

REFERENCE_FREE: frozenset[str] = frozenset(n for n, spec in LOSSES.items() if spec.reference_free)
"""Losses that never look at the reference model's log-probabilities."""



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
        self._check_loss_options(types, eps)

    def _check_loss_options(self, types: tuple[str, ...], eps: float) -> None:
        """What the options' ranges cannot say alone: exo_pair's ε and which losses f-DPO applies to."""
        if "exo_pair" in types and eps == 0:
            raise PreftuneError("exo_pair needs label_smoothing > 0: it is ε of EXO's target [1-ε, ε] and log ε "
                                "must be finite; the EXO paper uses 1e-3.")
        kind = self.f_divergence_type
        unsupported = [t for t in types if not LOSSES[t].f_divergence]
        if kind != "reverse_kl" and unsupported:
            raise PreftuneError(
                f"f_divergence_type={kind} does not apply to {', '.join(unsupported)} (only losses of the "
                f"chosen-minus-rejected reward gap have an f-DPO form: "
                f"{', '.join(n for n, spec in LOSSES.items() if spec.f_divergence)}); use reverse_kl with them.")
        sorting = [t for t in types if LOSSES[t].sorts_batch]
        if self.use_weighting and sorting:
            raise PreftuneError(f"use_weighting (WPO) weighs each pair, but {', '.join(sorting)} sorts the batch (its "
                                "i-th term is a quantile, not pair i); use another loss or drop use_weighting.")
        self._check_unpaired(types)
        with_nll = [t for t in types if LOSSES[t].nll]
        if self.ld_alpha is not None and with_nll:
            raise PreftuneError(f"ld_alpha (LD-DPO) shortens the log-probs a preference loss reads, but "
                                f"{', '.join(with_nll)} also trains its NLL on the whole answer; use ld_alpha with the "
                                "DPO-family losses.")

    def _check_unpaired(self, types: tuple[str, ...]) -> None:
        """Unpaired losses read other data (one answer and a label) than the pairwise ones: never mixed."""
        unpaired = [t for t in types if LOSSES[t].unpaired]
        if not unpaired:
            return
        paired = [t for t in types if not LOSSES[t].unpaired]
        if paired:
            raise PreftuneError(f"{'+'.join(unpaired)} trains on unpaired examples (one answer with a desirable/"
                                f"undesirable label) and {'+'.join(paired)} on pairs; use them in separate runs.")
        pair_only = [name for name, on in (("sft_weight", self.sft_weight > 0), ("use_weighting", self.use_weighting),
                                           ("ld_alpha", self.ld_alpha is not None)) if on]
        if pair_only:
            raise PreftuneError(f"{pair_only[0]} applies to pairs (a chosen and a rejected answer); "
                                f"{'+'.join(unpaired)} trains on unpaired examples: drop it.")

    @property
    def unpaired(self) -> bool:
        """Whether the losses read unpaired examples (KTO, apo_zero_unpaired): then every one of them does."""
        return LOSSES[self.loss_types[0]].unpaired

    @property
    def needs_reference(self) -> bool:
        """False only when every loss type is reference-free (then no reference model is loaded)."""
        return not all(LOSSES[t].reference_free for t in self.loss_types)

    @property
    def uses_reward_shift(self) -> bool:
        """Whether a loss reads BCO's running reward mean (the objective then updates it every step)."""
        return any(LOSSES[t].uses_reward_shift for t in self.loss_types)

    def check_reference(self, reference: str, reference_model: str | None = None, lora: bool = False) -> None:
        """A reference setting these losses cannot use is one sentence (`PreftuneError`), before any work.

        `reference` is TrainConfig's strategy (auto, copy, lora_disabled, precomputed, none). A reference-free
        configuration (every loss reference-free: simpo, orpo, cpo) loads and scores no reference model, so a
        named strategy or `reference_model` would be silently ignored. (`none` with a loss that needs a reference
        is the objective's check: SFT runs take the same settings and need none.) TR-DPO (`sync_ref_model`) needs
        a reference model of its own that it can move: `copy` (what auto picks), never precomputed log-probs or
        the base weights under LoRA adapters (TRL refuses both as well).
        """
        names = "+".join(self.loss_types)
        if self.sync_ref_model:
            need(self.needs_reference, f"sync_ref_model (TR-DPO) moves the reference, but loss {names} has none; "
                                       "drop sync_ref_model or use a loss with a reference.")
            need(reference != "precomputed", "TR-DPO (sync_ref_model) moves the reference during training, so its "
                                             "log-probs cannot be precomputed; use reference copy.")
            need(not lora and reference != "lora_disabled", "TR-DPO (sync_ref_model) needs a reference model of its "
                 "own to move, and with LoRA the reference is the base weights under the adapters; train without "
                 "lora (reference copy), or drop sync_ref_model.")
        if self.needs_reference:
            return
        if reference not in ("auto", "none"):
            raise PreftuneError(f"reference '{reference}' has no use with loss {names}: it needs no reference "
                                "model (none is loaded or scored); leave reference at auto or set it to none.")
        if reference_model:
            raise PreftuneError(f"reference_model has no use with loss {names}: it needs no reference model; "
                                "remove reference_model.")

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


def _named_inputs(shape: torch.Size, **named: Tensor | None) -> None:
    for name, t in named.items():
        if t is not None and (t.dim() != 1 or t.shape != shape):
            raise ValueError(
                f"{name} must have shape [B] = {list(shape)} like policy_chosen_logps, got {list(t.shape)}"
            )


def _required(what: str, **named: Tensor | None) -> list[Tensor]:
    missing = [name for name, t in named.items() if t is None]
    if missing:
        raise ValueError(f"{what} needs {', '.join(missing)}, got None")
    return [_as_float(t) for t in named.values()]  # type: ignore[arg-type]


def preference_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor | None,
    reference_rejected_logps: Tensor | None,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    config: LossConfig,
    reward_shift: float = 0.0,
    *,
    policy_chosen_shared_logps: Tensor | None = None,
    policy_rejected_shared_logps: Tensor | None = None,
    reference_chosen_shared_logps: Tensor | None = None,
    reference_rejected_shared_logps: Tensor | None = None,
    chosen_aligned_logps: Tensor | None = None,
    rejected_aligned_logps: Tensor | None = None,
) -> LossOutput:
    """Total per-pair loss: w·(Σ_k w_k·loss_k + sft_weight·(-pc/|c|)), plus detached implicit rewards.

    All inputs are [B]; `reference_*` may be None only when `config.needs_reference` is False.
    `reward_shift` is the BCO δ (`RewardShift.value`), used only by ``bco_pair``.
    With `config.ld_alpha` (LD-DPO) every summed log-prob the losses read is first desensitised from the
    `*_shared_logps` (its answer's first min(|c|, |r|) tokens; `transforms.ld_logps`); the sft term keeps the
    whole answer. With `config.use_weighting` (WPO) the pair's loss is multiplied by its weight w from
    `chosen_aligned_logps`, `rejected_aligned_logps` (`transforms.wpo_weights`); else w = 1.
    Losses marked `f_divergence` read f'(π/π_ref) of `config.f_divergence_type` where the others read
    log π/π_ref (the same tensors under the default reverse KL).
    Rewards: β·chosen_logratios and β·rejected_logratios; for a reference-free config (simpo, orpo, cpo)
    β·pc/|c| and β·pr/|r| (SimPO's implicit reward; ORPO's β·log P in TRL).
    Returns `LossOutput` with three [B] tensors (the caller takes the mean of `losses`).
    """
    if config.unpaired:
        raise ValueError(f"loss types {config.loss_types} read unpaired examples: call unpaired_loss")
    if config.needs_reference and (reference_chosen_logps is None or reference_rejected_logps is None):
        raise ValueError(
            f"loss types {config.loss_types} need reference_chosen_logps and reference_rejected_logps, got None"
        )
    _named_inputs(policy_chosen_logps.shape, policy_chosen_logps=policy_chosen_logps,
                  policy_rejected_logps=policy_rejected_logps,
                  reference_chosen_logps=reference_chosen_logps, reference_rejected_logps=reference_rejected_logps,
                  chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths,
                  policy_chosen_shared_logps=policy_chosen_shared_logps,
                  policy_rejected_shared_logps=policy_rejected_shared_logps,
                  reference_chosen_shared_logps=reference_chosen_shared_logps,
                  reference_rejected_shared_logps=reference_rejected_shared_logps,
                  chosen_aligned_logps=chosen_aligned_logps, rejected_aligned_logps=rejected_aligned_logps)
    whole_pc = pc = _as_float(policy_chosen_logps)
    pr = _as_float(policy_rejected_logps)
    lc, lr = _as_float(chosen_lengths), _as_float(rejected_lengths)
    rc = rr = None
    if config.needs_reference:
        assert reference_chosen_logps is not None and reference_rejected_logps is not None
        rc, rr = _as_float(reference_chosen_logps), _as_float(reference_rejected_logps)
    if config.ld_alpha is not None:
        pcs, prs = _required("ld_alpha", policy_chosen_shared_logps=policy_chosen_shared_logps,
                             policy_rejected_shared_logps=policy_rejected_shared_logps)
        pc, pr = ld_logps(pcs, pc, config.ld_alpha), ld_logps(prs, pr, config.ld_alpha)
        if rc is not None:
            rcs, rrs = _required("ld_alpha", reference_chosen_shared_logps=reference_chosen_shared_logps,
                                 reference_rejected_shared_logps=reference_rejected_shared_logps)
            rc, rr = ld_logps(rcs, rc, config.ld_alpha), ld_logps(rrs, rr, config.ld_alpha)
    stats = _pair_stats(pc, pr, rc, rr, lc, lr, config, reward_shift)
    total: Tensor | None = None
    for loss_type, weight in zip(config.loss_types, config.weights):
        term = LOSSES[loss_type].compute(stats, config)
        # A weight of exactly 1.0 is skipped so the single-loss path is bit-identical to the formula.
        term = term if weight == 1.0 else weight * term
        total = term if total is None else total + term
    assert total is not None
    if config.sft_weight > 0:
        total = total + config.sft_weight * sft_loss(whole_pc, lc)
    if config.use_weighting:
        ac, ar = _required("use_weighting", chosen_aligned_logps=chosen_aligned_logps,
                           rejected_aligned_logps=rejected_aligned_logps)
        total = total * wpo_weights(ac, lc, ar, lr)
    return LossOutput(total, *_rewards(stats, config.beta))


def _pair_stats(pc: Tensor, pr: Tensor, rc: Tensor | None, rr: Tensor | None, lc: Tensor, lr: Tensor,
                config: LossConfig, reward_shift: float) -> PairStats:
    """The statistics every registered loss reads (log-ratios and f-DPO scores only with a reference)."""
    if rc is None or rr is None:
        return PairStats(pc, pr, lc, lr, reward_shift=reward_shift)
    chosen_logratios, rejected_logratios = pc - rc, pr - rr
    kind, alpha = config.f_divergence_type, config.f_alpha_divergence_coef
    return PairStats(pc, pr, lc, lr, rc, rr, chosen_logratios, rejected_logratios,
                     f_divergence_scores(chosen_logratios, kind, alpha),
                     f_divergence_scores(rejected_logratios, kind, alpha), reward_shift)


def _rewards(stats: PairStats, beta: float) -> tuple[Tensor, Tensor]:
    """Detached implicit rewards: β·log π/π_ref, or β·log π/|y| without a reference."""
    with torch.no_grad():
        if stats.chosen_logratios is not None and stats.rejected_logratios is not None:
            return beta * stats.chosen_logratios.detach(), beta * stats.rejected_logratios.detach()
        return (beta * per_token(stats.policy_chosen_logps.detach(), stats.chosen_lengths),
                beta * per_token(stats.policy_rejected_logps.detach(), stats.rejected_lengths))


def unpaired_loss(policy_logps: Tensor, reference_logps: Tensor, desirable: Tensor, config: LossConfig,
                  reference_point: float | Tensor = 0.0) -> tuple[Tensor, Tensor]:
    """Per-example loss Σ_k w_k·loss_k over unpaired examples, and the detached implicit rewards β·log π/π_ref.

    `policy_logps`, `reference_logps` [N]: each answer's summed log-probs; `desirable` [N] bool (its label);
    `reference_point`: KTO's z0 (`unpaired.kto_reference_point`, one per global batch), read only by ``kto``.
    Returns ([N] losses, [N] rewards); the caller sums and normalises by the global batch's examples.
    """
    if not config.unpaired:
        raise ValueError(f"loss types {config.loss_types} read pairs: call preference_loss")
    logratios = _as_float(policy_logps) - _as_float(reference_logps)
    z0 = torch.as_tensor(reference_point, dtype=logratios.dtype, device=logratios.device).detach()
    stats = ExampleStats(logratios, desirable.to(device=logratios.device, dtype=torch.bool), z0)
    total: Tensor | None = None
    for loss_type, weight in zip(config.loss_types, config.weights):
        term = LOSSES[loss_type].compute(stats, config)  # type: ignore[arg-type]
        term = term if weight == 1.0 else weight * term
        total = term if total is None else total + term
    assert total is not None
    return total, config.beta * logratios.detach()
