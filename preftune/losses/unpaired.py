"""Losses over unpaired examples (one answer with a desirable/undesirable label): KTO and APO-zero's unpaired form.

Pure functions of per-example statistics, registered in registry.py with ``unpaired=True`` (they read
`ExampleStats`, not `PairStats`); the data comes from `preftune.data.unpaired`, KTO's reference point from a
no-grad pass over mismatched (prompt, completion) pairs of the global batch (`preftune.objectives`). Inputs are
[N] tensors, N = examples in the batch: ``logratios`` = log π(y|x) - log π_ref(y|x) summed over the answer's
tokens, ``desirable`` a bool mask (True = thumbs-up).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class ExampleStats:
    """The per-example statistics every unpaired loss is a function of: ``logratios`` [N] float, ``desirable`` [N]
    bool, ``reference_point`` KTO's z0 (a detached 0-d tensor; 0 where no KTO term is configured)."""

    logratios: Tensor
    desirable: Tensor
    reference_point: Tensor


def kto_reference_point(mismatched_logratio_sum: float | Tensor, count: float | Tensor) -> Tensor:
    """KTO's reference point z0: the batch's KL estimate, clamped at 0, with no gradient.

    z0 = max(0, Σ_j [log π(y'_j|x_j) - log π_ref(y'_j|x_j)] / n), over n mismatched pairs (x_j, y'_j): each
    prompt with an answer written for another prompt of the same batch, so the average estimates
    KL(π ‖ π_ref) away from the data's own answers. Pass the sum and count over the whole global batch
    (all micro-batches, all processes, summed) to get one estimate per optimizer step.

    Paper: Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization",
    arXiv:2402.01306 (z0, Section 4). Shapes: scalars (floats or 0-d tensors) -> 0-d tensor.
    """
    total = torch.as_tensor(mismatched_logratio_sum, dtype=torch.float64).detach()
    n = torch.as_tensor(count, dtype=torch.float64).detach()
    if float(n) <= 0:
        raise ValueError("kto_reference_point needs at least one mismatched pair")
    return torch.clamp_min(total / n, 0.0)


def kto_loss(
    logratios: Tensor,
    desirable: Tensor,
    reference_point: float | Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> Tensor:
    """KTO: a prospect-theoretic value of each answer's implicit reward around the reference point z0.

    r = β·logratios; desirable: λ_D·(1 - σ(r - β·z0)), undesirable: λ_U·(1 - σ(β·z0 - r)).
    z0 (`kto_reference_point`) carries no gradient. At policy = reference (r = 0, z0 = 0) every example's
    loss is λ/2.

    Paper: Ethayarajh et al. 2024, arXiv:2402.01306 (Eq. 7 with TRL's λ_D, λ_U). The paper's rule for
    imbalanced data is λ_D·n_D / (λ_U·n_U) in [1, 4/3] (`preftune.data.unpaired.weight_suggestion`).
    Shapes: logratios [N], desirable [N] bool -> [N].
    """
    z0 = torch.as_tensor(reference_point, dtype=logratios.dtype, device=logratios.device).detach()
    margin = beta * (logratios - z0)
    return torch.where(desirable, desirable_weight * (1.0 - torch.sigmoid(margin)),
                       undesirable_weight * (1.0 - torch.sigmoid(-margin)))


def apo_zero_unpaired_loss(
    logratios: Tensor, desirable: Tensor, beta: float, desirable_weight: float = 1.0, undesirable_weight: float = 1.0
) -> Tensor:
    """APO-zero on unpaired examples: push desirable answers' likelihood up and undesirable ones' down.

    desirable: λ_D·(1 - σ(β·logratios)); undesirable: λ_U·σ(β·logratios). No reference point.

    Paper: D'Oosterlinck et al. 2024, "Anchored Preference Optimization and Contrastive Revisions",
    arXiv:2408.06266 (the unpaired form of its Eq. 7, as TRL's KTOTrainer has it).
    Shapes: logratios [N], desirable [N] bool -> [N].
    """
    r = beta * logratios
    return torch.where(desirable, desirable_weight * (1.0 - torch.sigmoid(r)), undesirable_weight * torch.sigmoid(r))
