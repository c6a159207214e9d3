"""Transforms of the per-pair statistics before or after a loss reads them: f-divergence scores (f-DPO), the
length-desensitised log-probs of LD-DPO (`ld_alpha`) and the pair weights of WPO (`use_weighting`);
`preference_loss` applies them. The last two read statistics the forward computes when its plan asks
(logprobs.STATISTICS: each answer's first-ℓ sum, and its aligned sum).

Each is a small pure function with formula, paper and shapes in its docstring, like `formulas.py`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from preftune.options import F_DIVERGENCES

# exp() of more than this overflows float32 (its largest finite value is e^88.7): beyond it the score is held at
# its value there (and its gradient is 0) rather than becoming inf and the loss NaN. Only reached when the
# policy has moved e^80-fold from the reference on a whole answer; TRL clamps α-divergence the same way.
_EXP_LIMIT = 80.0


def f_divergence_scores(logratios: Tensor, divergence: str, alpha: float = 0.5) -> Tensor:
    """f'(u) at u = π/π_ref = exp(logratios): what replaces the log-ratio in a DPO-style loss under f-DPO.

    DPO's log π/π_ref is f'(u) for the reverse KL; f-DPO keeps the same losses with another f:

        reverse_kl        f'(u) = log u                       (DPO itself)
        forward_kl        f'(u) = 1 - 1/u
        js_divergence     f'(u) = log(2u / (1 + u)) = log 2 + logσ(log u)
        alpha_divergence  f'(u) = (1 - u^(-α)) / α,  0 < α < 1 (α → 0: reverse KL, α → 1: forward KL)

    Each is shifted so that f'(1) = 0 (scores are 0 where policy = reference, as log-ratios are): the
    chosen-minus-rejected difference the paper uses is unchanged, and the per-token losses (ipo,
    sigmoid_norm) stay 0-centred as in TRL. The exponent is capped at 80 (see `_EXP_LIMIT`).

    Paper: Wang et al. 2023, "Beyond Reverse KL: Generalizing Direct Preference Optimization with Diverse
    Divergence Constraints", arXiv:2309.16240 (its α is the exponent of u^(-α), as in TRL's documentation;
    TRL 1.16's code computes (u^(α-1) - 1)/(α - 1), which is this with α replaced by 1 - α: the same at
    its default α = 0.5). Shapes: logratios any shape -> same.
    """
    if divergence == "reverse_kl":
        return logratios
    if divergence == "forward_kl":
        return 1.0 - torch.exp(torch.clamp_max(-logratios, _EXP_LIMIT))
    if divergence == "js_divergence":
        return math.log(2.0) + F.logsigmoid(logratios)
    if divergence == "alpha_divergence":
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha_divergence needs 0 < alpha < 1, got {alpha}")
        return (1.0 - torch.exp(torch.clamp_max(-alpha * logratios, _EXP_LIMIT))) / alpha
    raise ValueError(f"unknown f-divergence {divergence!r}; one of {', '.join(F_DIVERGENCES)}")


def ld_logps(shared_logps: Tensor, total_logps: Tensor, alpha: float) -> Tensor:
    """LD-DPO's length-desensitised log-prob of an answer.

    With ℓ = min(|c|, |r|) the pair's shared length, an answer's log-prob is split into its first ℓ tokens
    (`shared_logps`) and the rest, the "verbose" tail (`total_logps - shared_logps`), which is damped:
    logps = shared + α·(total - shared). α = 1 is plain DPO, α = 0 drops the tail. Applied to the policy's
    and the reference's log-probs alike, before any loss reads them.

    Paper: Liu et al. 2024, "Length Desensitization in Direct Preference Optimization", arXiv:2409.06411
    (TRL: `ld_alpha`). Shapes: [B], [B] -> [B] (chosen and rejected separately).
    """
    return shared_logps + alpha * (total_logps - shared_logps)


def wpo_weights(
    chosen_aligned_logps: Tensor, chosen_lengths: Tensor, rejected_aligned_logps: Tensor, rejected_lengths: Tensor
) -> Tensor:
    """WPO's per-pair weight: how likely the policy is to produce the pair itself.

    For an answer y, a = Σ_t [log π(y_t | x, y_<t) - log Σ_v π(v | x, y_<t)²] (its log-probs "aligned" by the
    log of each step's collision probability Σ_v π(v)², so a model that is certain everywhere weighs 1; the
    forward computes a with one more logsumexp per token, `logprobs.token_logps(collision=True)`); the weight is
    w(y) = exp(a/|y|) and the pair's weight w(c)·w(r), with no gradient. Every loss term of the pair is
    multiplied by it.

    Paper: Zhou et al. 2024, "WPO: Enhancing RLHF with Weighted Preference Optimization", arXiv:2406.11827
    (its Eq. 2 with TRL's `use_weighting` normalisation). Shapes: four [B] tensors -> [B].
    """
    with torch.no_grad():
        log_weight = chosen_aligned_logps / chosen_lengths.clamp_min(1.0) + rejected_aligned_logps / \
            rejected_lengths.clamp_min(1.0)
        return torch.exp(log_weight)
