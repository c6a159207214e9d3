"""The loss registry: each name → the formula it computes (formulas.py) and the properties the rest of the code
asks about (does it need a reference, label smoothing, lengths, BCO's reward shift, an f-divergence).

Adding a loss is one function in formulas.py plus one `register` call here; config validation,
`LossConfig.needs_reference`, the README check and `preference_loss` all read this table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor

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
    orpo_loss,
    robust_loss,
    sigmoid_loss,
    sigmoid_norm_loss,
    simpo_loss,
    sppo_hard_loss,
)
from preftune.losses.unpaired import apo_zero_unpaired_loss, kto_loss

if TYPE_CHECKING:
    from preftune.losses import LossConfig


@dataclass(frozen=True)
class PairStats:
    """The per-pair statistics every loss is a function of; all [B] float tensors.

    The reference log-probs, ``*_logratios`` (policy - reference) and ``*_scores`` are None for a
    reference-free configuration. ``*_scores`` are f'(π/π_ref) of the configured f-divergence
    (`transforms.f_divergence_scores`): the log-ratios themselves under the default reverse KL.
    ``reward_shift`` is BCO's running δ (a float), 0 until the first optimizer step.
    """

    policy_chosen_logps: Tensor
    policy_rejected_logps: Tensor
    chosen_lengths: Tensor
    rejected_lengths: Tensor
    reference_chosen_logps: Tensor | None = None
    reference_rejected_logps: Tensor | None = None
    chosen_logratios: Tensor | None = None
    rejected_logratios: Tensor | None = None
    chosen_scores: Tensor | None = None
    rejected_scores: Tensor | None = None
    reward_shift: float = 0.0


@dataclass(frozen=True)
class LossSpec:
    """A registered loss: ``compute(stats, config) -> [B]`` and the properties the rest of the code asks about."""

    name: str
    compute: Callable[[PairStats, LossConfig], Tensor]
    reference_free: bool = False  # never reads the reference log-probs (no reference model is loaded)
    label_smoothing: bool = False  # has an ε term (`label_smoothing`)
    uses_reward_shift: bool = False  # reads BCO's running reward mean, which the objective updates per step
    f_divergence: bool = False  # a function of the chosen-minus-rejected reward gap: f-DPO may replace log π/π_ref
    sorts_batch: bool = False  # entry i is the batch's i-th quantile, not pair i (no per-pair weight applies)
    nll: bool = False  # holds an NLL term on the whole chosen answer (LD-DPO's shortened log-probs do not apply)
    unpaired: bool = False  # reads unpaired examples (`unpaired.ExampleStats`: one answer and its label), not pairs


LOSSES: dict[str, LossSpec] = {}


def register(name: str, compute: Callable[[PairStats, LossConfig], Tensor], **properties: bool) -> LossSpec:
    """Add a loss to the registry under `name` (see `LossSpec` for the properties)."""
    if name in LOSSES:
        raise ValueError(f"loss {name!r} is already registered")
    LOSSES[name] = spec = LossSpec(name, compute, **properties)
    return spec


# The adapters below only pick the statistics each formula reads. The losses built on the chosen-minus-rejected
# reward gap read the f-divergence scores (the log-ratios under the default reverse KL), as TRL's DPOTrainer does;
# the others read the log-ratios, for which f-DPO gives no valid generalisation.
register("sigmoid", lambda s, c: sigmoid_loss(s.chosen_scores, s.rejected_scores, c.beta, c.label_smoothing),
         label_smoothing=True, f_divergence=True)
register("robust", lambda s, c: robust_loss(s.chosen_scores, s.rejected_scores, c.beta, c.label_smoothing),
         label_smoothing=True, f_divergence=True)
register("ipo", lambda s, c: ipo_loss(s.chosen_scores, s.rejected_scores, s.chosen_lengths, s.rejected_lengths,
                                      c.beta), f_divergence=True)
register("hinge", lambda s, c: hinge_loss(s.chosen_scores, s.rejected_scores, c.beta), f_divergence=True)
register("sigmoid_norm", lambda s, c: sigmoid_norm_loss(s.chosen_scores, s.rejected_scores, s.chosen_lengths,
                                                        s.rejected_lengths, c.beta, c.label_smoothing),
         label_smoothing=True, f_divergence=True)
register("simpo", lambda s, c: simpo_loss(s.policy_chosen_logps, s.policy_rejected_logps, s.chosen_lengths,
                                          s.rejected_lengths, c.beta, c.simpo_gamma, c.label_smoothing),
         reference_free=True, label_smoothing=True)
register("apo_zero", lambda s, c: apo_zero_loss(s.chosen_logratios, s.rejected_logratios, c.beta))
register("apo_down", lambda s, c: apo_down_loss(s.chosen_logratios, s.rejected_logratios, c.beta))
register("nca_pair", lambda s, c: nca_pair_loss(s.chosen_logratios, s.rejected_logratios, c.beta))
register("bco_pair", lambda s, c: bco_pair_loss(s.chosen_logratios, s.rejected_logratios, c.beta, s.reward_shift),
         uses_reward_shift=True)
register("dpop", lambda s, c: dpop_loss(s.chosen_logratios, s.rejected_logratios, c.beta, c.dpop_lambda))
register("exo_pair", lambda s, c: exo_pair_loss(s.chosen_scores, s.rejected_scores, c.beta, c.label_smoothing),
         label_smoothing=True, f_divergence=True)
register("sppo_hard", lambda s, c: sppo_hard_loss(s.chosen_logratios, s.rejected_logratios, c.beta))
register("aot", lambda s, c: aot_loss(s.policy_chosen_logps, s.policy_rejected_logps, s.reference_chosen_logps,
                                      s.reference_rejected_logps, c.beta, c.label_smoothing), label_smoothing=True,
         sorts_batch=True)
register("aot_unpaired", lambda s, c: aot_unpaired_loss(s.chosen_logratios, s.rejected_logratios, c.beta,
                                                        c.label_smoothing), label_smoothing=True, sorts_batch=True)
register("discopop", lambda s, c: discopop_loss(s.chosen_scores, s.rejected_scores, c.beta, c.discopop_tau),
         f_divergence=True)
# ORPO's λ is `beta`, as in TRL's ORPOConfig (its docstring: "denoted by λ in the paper").
register("orpo", lambda s, c: orpo_loss(s.policy_chosen_logps, s.policy_rejected_logps, s.chosen_lengths,
                                        s.rejected_lengths, c.beta), reference_free=True, nll=True)
register("cpo", lambda s, c: cpo_loss(s.policy_chosen_logps, s.policy_rejected_logps, s.chosen_lengths, c.beta,
                                      c.cpo_alpha, c.label_smoothing),
         reference_free=True, label_smoothing=True, nll=True)
# Unpaired examples (preftune.data.unpaired): `s` is an unpaired.ExampleStats.
register("kto", lambda s, c: kto_loss(s.logratios, s.desirable, s.reference_point, c.beta, c.desirable_weight,
                                      c.undesirable_weight), unpaired=True)
register("apo_zero_unpaired", lambda s, c: apo_zero_unpaired_loss(s.logratios, s.desirable, c.beta,
                                                                  c.desirable_weight, c.undesirable_weight),
         unpaired=True)
