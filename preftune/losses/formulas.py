"""The loss formulas: one small pure function each, over per-pair statistics of shape [B].

Each docstring gives the formula, the paper and the shapes; `preftune.losses` registers them by name and
documents the statistics (logratios, lengths) and what β means.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

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


def per_token(logps: Tensor, lengths: Tensor) -> Tensor:
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
    h_norm = per_token(chosen_logratios, chosen_lengths) - per_token(rejected_logratios, rejected_lengths)
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
    h_norm = per_token(chosen_logratios, chosen_lengths) - per_token(rejected_logratios, rejected_lengths)
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
    margin = per_token(policy_chosen_logps, chosen_lengths) - per_token(
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
    return -per_token(policy_chosen_logps, chosen_lengths)


def nll_loss(logps: Tensor, lengths: Tensor) -> Tensor:
    """Token-level mean NLL for the SFT task: -sum(logps) / sum(lengths).

    Every token in the batch weighs the same (unlike the mean of per-sequence means).
    Shapes: logps [N] summed log-probs per sequence, lengths [N] token counts -> scalar [].
    """
    return -logps.sum() / lengths.sum().clamp_min(1.0)
