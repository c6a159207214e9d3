"""The loss formulas: one small pure function each, over per-pair statistics of shape [B].

Each docstring gives the formula, the paper and the shapes; `preftune.losses` registers them by name and
documents the statistics (logratios, lengths) and what β means.
"""

from __future__ import annotations

import math

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


def exo_pair_loss(
    chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float, label_smoothing: float
) -> Tensor:
    """EXO (pairwise form): the reverse KL from the model's preference distribution to a smoothed label.

    q = σ(β·h) and 1-q are the probabilities the policy's implicit rewards give chosen and rejected;
    the target puts 1-ε on chosen and ε on rejected (ε = `label_smoothing`, which must be in (0, 1));
    loss = KL(q ‖ [1-ε, ε]) = q·(log q - log(1-ε)) + (1-q)·(log(1-q) - log ε),  h = chosen_logratios -
    rejected_logratios. Minimum 0 where q = 1-ε (the fitted reward gap stops growing, unlike DPO's).

    Paper: Ji et al. 2024, "Towards Efficient Exact Optimization of Language Model Alignment",
    arXiv:2402.00856 (EXO-pref with K = 2 answers); the paper suggests ε = 1e-3.
    Shapes: [B], [B] -> [B].
    """
    if not 0.0 < label_smoothing < 1.0:
        raise ValueError(f"exo_pair_loss needs 0 < label_smoothing < 1, got {label_smoothing}")
    z = beta * (chosen_logratios - rejected_logratios)
    return (torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-label_smoothing))
            + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(label_smoothing)))


def sppo_hard_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float) -> Tensor:
    """SPPO with hard win probabilities: regress each log-ratio on ±η/2, η = 1/β.

    loss = (chosen_logratios - 1/(2β))² + (rejected_logratios + 1/(2β))².

    Paper: Wu et al. 2024, "Self-Play Preference Optimization for Language Model Alignment",
    arXiv:2405.00675: the square loss of its Algorithm 1 with the estimated win probability P̂(y ≻ π)
    set to 1 for the chosen answer and 0 for the rejected one (the soft version needs a preference model
    and is not this function). Shapes: [B], [B] -> [B].
    """
    return (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2


def aot_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> Tensor:
    """AOT (paired): distributional preference alignment by one-dimensional optimal transport.

    u = sort(pc - pr) and v = sort(rc - rr) over the batch (ascending), Δ = u - v (the i-th quantile of
    the policy's margins against the reference's); loss_i = -(1-ε)·logσ(β·Δ_i) - ε·logσ(-β·Δ_i).
    Entry i belongs to the i-th quantile, not to pair i; the batch is the sample of the distribution, so
    the value depends on which pairs share a micro-batch (a batch of one is DPO on the same pair).

    Paper: Melnyk et al. 2024, "Distributional Preference Alignment of LLMs via Optimal Transport",
    arXiv:2406.05882. Shapes: four [B] tensors -> [B].
    """
    policy_margins, _ = torch.sort(policy_chosen_logps - policy_rejected_logps, dim=0)
    reference_margins, _ = torch.sort(reference_chosen_logps - reference_rejected_logps, dim=0)
    return _smoothed_neg_logsigmoid(beta * (policy_margins - reference_margins), label_smoothing)


def aot_unpaired_loss(
    chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float, label_smoothing: float = 0.0
) -> Tensor:
    """AOT (unpaired): the chosen log-ratios' distribution should dominate the rejected ones' quantile by quantile.

    Δ = sort(chosen_logratios) - sort(rejected_logratios) over the batch (ascending, each sorted on its
    own, so which rejected answer came with which chosen one is not used);
    loss_i = -(1-ε)·logσ(β·Δ_i) - ε·logσ(-β·Δ_i). As for `aot_loss`, entry i is the i-th quantile.

    Paper: Melnyk et al. 2024, "Distributional Preference Alignment of LLMs via Optimal Transport",
    arXiv:2406.05882. Shapes: [B], [B] -> [B].
    """
    chosen_sorted, _ = torch.sort(chosen_logratios, dim=0)
    rejected_sorted, _ = torch.sort(rejected_logratios, dim=0)
    return _smoothed_neg_logsigmoid(beta * (chosen_sorted - rejected_sorted), label_smoothing)


def discopop_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float, tau: float = 0.05) -> Tensor:
    """DiscoPOP (log-ratio modulated loss): a blend of the logistic (DPO) and exponential losses.

    z = β·h, h = chosen_logratios - rejected_logratios, m = σ(z/τ);
    loss = (1 - m)·(-logσ(z)) + m·exp(-z).

    m·exp(-z) is computed as exp(logσ(z/τ) - z), the same number, because for a very negative z the
    product form is 0·inf = NaN in floating point.
    Paper: Lu et al. 2024, "Discovering Preference Optimization Algorithms with and for Large Language
    Models", arXiv:2406.08414 (τ = 0.05 there). Shapes: [B], [B] -> [B].
    """
    z = beta * (chosen_logratios - rejected_logratios)
    scaled = z / tau
    return (1.0 - torch.sigmoid(scaled)) * -F.logsigmoid(z) + torch.exp(F.logsigmoid(scaled) - z)


_MAX_MEAN_LOGP = -1e-6  # ORPO: a mean log-prob of 0 (P = 1) has infinite odds; see `odds_ratio_loss`


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - eˣ) for x < 0, accurate on both sides of -ln 2 (Mächler 2012, "Accurately Computing
    log(1 - exp(-|a|))"): log1p(-eˣ) far from 0, log(-expm1(x)) near it. Shapes: any -> same."""
    return torch.where(x < -math.log(2.0), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def odds_ratio_loss(
    policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, chosen_lengths: Tensor, rejected_lengths: Tensor
) -> Tensor:
    """ORPO's relative-ratio term L_OR: the log odds ratio of chosen over rejected through -logσ.

    P(y|x) = exp(logps/|y|) (length-averaged), odds(y|x) = P/(1-P);
    log odds ratio = (ac - ar) - (log(1-e^ac) - log(1-e^ar)),  ac = pc/|c|, ar = pr/|r|;
    loss = -logσ(log odds ratio).

    Paper: Hong, Lee & Thorne 2024, "ORPO: Monolithic Preference Optimization without Reference
    Model", arXiv:2403.07691 (its L_OR). The odds are infinite at P = 1, which float32 reaches when every
    token of an answer has probability 1 - 6e-8 or more (a confident model on a short answer): the mean
    log-probs are capped at -1e-6 (P = 1 - 1e-6), so the loss and its gradient stay finite (TRL's would be NaN).
    Shapes: four [B] tensors -> [B].
    """
    avg_chosen, avg_rejected = (per_token(logps, lengths).clamp_max(_MAX_MEAN_LOGP) for logps, lengths in (
        (policy_chosen_logps, chosen_lengths), (policy_rejected_logps, rejected_lengths)))
    log_odds = (avg_chosen - avg_rejected) - (log1mexp(avg_chosen) - log1mexp(avg_rejected))
    return -F.logsigmoid(log_odds)


def orpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    lam: float,
) -> Tensor:
    """ORPO: SFT and preference alignment in one reference-free loss.

    loss = -pc/|c| + λ·L_OR  (L_SFT + λ·L_OR, the paper's objective, per pair; see `odds_ratio_loss`).

    L_SFT is the chosen answer's per-token NLL, per pair (`sft_loss`): each pair weighs the same whatever
    its length, and prompt tokens are not trained. TRL's ORPOTrainer instead averages one cross-entropy
    over every non-padding token of the batch's chosen rows, prompt tokens included.
    Paper: Hong, Lee & Thorne 2024, arXiv:2403.07691. Shapes: four [B] tensors -> [B].
    """
    return sft_loss(policy_chosen_logps, chosen_lengths) + lam * odds_ratio_loss(
        policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths)


def cpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    beta: float,
    nll_weight: float = 1.0,
    label_smoothing: float = 0.0,
) -> Tensor:
    """CPO: a reference-free DPO-style contrast on summed log-probs, plus an NLL term on the chosen answer.

    z = β·(pc - pr);  loss = -(1-ε)·logσ(z) - ε·logσ(-z) + α·(-pc/|c|),  α = `nll_weight` (TRL's cpo_alpha).

    Paper: Xu et al. 2024, "Contrastive Preference Optimization: Pushing the Boundaries of LLM Performance
    in Machine Translation", arXiv:2401.08417 (L_prefer + L_NLL). The NLL is per pair and per token
    (`sft_loss`); TRL's CPOTrainer averages it over all chosen answer tokens of the batch instead (the same
    when the chosen answers have equal lengths). Shapes: three [B] tensors -> [B].
    """
    contrast = _smoothed_neg_logsigmoid(beta * (policy_chosen_logps - policy_rejected_logps), label_smoothing)
    return contrast + nll_weight * sft_loss(policy_chosen_logps, chosen_lengths)
