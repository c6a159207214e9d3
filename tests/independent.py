"""Second implementations for tests, written differently from the package so an expected value never comes
from the code under test: token ids from the Hugging Face tokenizer alone, log-probs from one unpadded row
and the model's own full logits, no batching, no KV cache, no chunking; the losses in float64 numpy from their
papers' equations. No preftune import."""

from __future__ import annotations

import numpy as np
import torch


def hand_ids(tok, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids + EOS) by encoding prompt and prompt+answer with the tokenizer itself.

    Valid only when the prompt's encoding is a prefix of the joint one (no BPE merge across the boundary),
    which is asserted: the tests' prompts end in ':' and answers start with a space, a pre-tokenizer split.
    """
    p = tok(prompt)["input_ids"]
    full = tok(prompt + answer)["input_ids"]
    assert full[:len(p)] == p, (prompt, answer)
    return p, full[len(p):] + [tok.eos_token_id]


def row_logp(model, prompt_ids: list[int], answer_ids: list[int]) -> torch.Tensor:
    """Σ log p(answer token | everything before it), one unpadded row, full logits (keeps the graph)."""
    ids = torch.tensor([prompt_ids + answer_ids])
    logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
    lp = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
    return lp[len(prompt_ids) - 1:].sum()


# ---------------------------------------------------------------------------------------------------------------
# The preference losses in float64 numpy, each from its paper's equation (not from preftune.losses): pc, pr, rc, rr
# are summed answer log-probs of policy and reference, lc, lr answer token counts, all [B] float64 arrays.
# sp(z) = log(1 + e^z) = -log σ(-z).
# ---------------------------------------------------------------------------------------------------------------

def sp(z):
    return np.logaddexp(0.0, z)


def sigma(z):
    return 1.0 / (1.0 + np.exp(-z))


def f_prime(u, divergence: str, alpha: float = 0.5):
    """f'(u) - f'(1) for the f of f-DPO's Table 1 (Wang et al. 2023, arXiv 2309.16240), u = π/π_ref: subtracting
    f'(1) makes every score 0 at u = 1 (a constant the chosen-minus-rejected difference drops anyway)."""
    derivatives = {
        "reverse_kl": lambda v: np.log(v) + 1.0,                              # f(u) = u log u
        "forward_kl": lambda v: -1.0 / v,                                     # f(u) = -log u
        "js_divergence": lambda v: np.log(v) - np.log((v + 1.0) / 2.0),       # f(u) = u log u - (u+1) log((u+1)/2)
        # f(u) = (u^(1-α) - (1-α)u - α) / (α(α-1))
        "alpha_divergence": lambda v: ((1 - alpha) * v ** (-alpha) - (1 - alpha)) / (alpha * (alpha - 1)),
    }
    d = derivatives[divergence]
    return d(u) - d(np.ones_like(u))


def _margin_loss(z, eps):
    """Binary cross-entropy of logit z against the soft label 1-ε."""
    return (1 - eps) * sp(-z) + eps * sp(z)


def numpy_losses(name: str, pc, pr, rc, rr, lc, lr, *, beta, eps=0.0, gamma=0.5, lam=50.0, shift=0.0, tau=0.05,
                 cpo_alpha=1.0, divergence="reverse_kl", alpha=0.5):
    """One loss by its paper's formula; hc, hr are log π/π_ref of chosen and rejected (replaced by f'(u) of
    `divergence` in the losses of the reward gap), h = hc - hr."""
    lc1, lr1 = np.maximum(lc, 1.0), np.maximum(lr, 1.0)
    if rc is not None:  # reference-free losses (simpo, orpo, cpo) may be given no reference
        hc, hr = pc - rc, pr - rr
        if name in ("sigmoid", "robust", "ipo", "hinge", "sigmoid_norm", "exo_pair", "discopop"):
            hc, hr = f_prime(np.exp(hc), divergence, alpha), f_prime(np.exp(hr), divergence, alpha)
        h, h_norm = hc - hr, hc / lc1 - hr / lr1
    nll = -pc / lc1                 # per-token NLL of the chosen answer (SFT term of RPO, ORPO, CPO)
    if name == "sigmoid":          # Rafailov et al. 2023; cDPO smoothing: label flipped with probability ε
        return _margin_loss(beta * h, eps)
    if name == "robust":           # Chowdhury et al. 2024, unbiased under flip rate ε
        return ((1 - eps) * sp(-beta * h) - eps * sp(beta * h)) / (1 - 2 * eps)
    if name == "ipo":              # Azar et al. 2023, per-token log-ratios as in TRL
        return (h_norm - 1 / (2 * beta)) ** 2
    if name == "hinge":            # RSO / SLiC
        return np.maximum(0.0, 1 - beta * h)
    if name == "sigmoid_norm":
        return _margin_loss(beta * h_norm, eps)
    if name == "simpo":            # Meng et al. 2024: reference-free, per-token, margin γ
        return _margin_loss(beta * (pc / lc1 - pr / lr1) - gamma, eps)
    if name == "apo_zero":         # D'Oosterlinck et al. 2024
        return 1 - sigma(beta * hc) + sigma(beta * hr)
    if name == "apo_down":
        return sigma(beta * hc) + 1 - sigma(beta * h)
    if name == "nca_pair":         # Chen et al. 2024
        return sp(-beta * hc) + 0.5 * sp(beta * hc) + 0.5 * sp(beta * hr)
    if name == "bco_pair":         # Jung et al. 2024, rewards shifted by δ
        return sp(-(beta * hc - shift)) + sp(beta * hr - shift)
    if name == "dpop":             # Pal et al. 2024: penalty when the chosen log-prob falls below the reference's
        return sp(-beta * (h - lam * np.maximum(0.0, rc - pc)))
    if name == "exo_pair":         # Ji et al. 2024: KL(p_θ ‖ p_target), p_θ = softmax of β·rewards over the 2 answers
        logits = np.stack([beta * hc, beta * hr])
        p = np.exp(logits - np.logaddexp(logits[0], logits[1]))
        target = np.array([1 - eps, eps])[:, None]
        return (p * (np.log(p) - np.log(target))).sum(axis=0)
    if name == "sppo_hard":        # Wu et al. 2024: (log π/π_t - η(P - 1/2))², P = 1 / 0, η = 1/β
        eta = 1 / beta
        return (hc - eta * (1 - 0.5)) ** 2 + (hr - eta * (0 - 0.5)) ** 2
    if name == "aot":              # Melnyk et al. 2024: sorted policy margins against sorted reference margins
        return _margin_loss(beta * (np.sort(pc - pr) - np.sort(rc - rr)), eps)
    if name == "aot_unpaired":     # ... chosen log-ratios' quantiles against rejected ones'
        return _margin_loss(beta * (np.sort(hc) - np.sort(hr)), eps)
    if name == "discopop":         # Lu et al. 2024: logistic/exponential blend modulated by σ(βh/τ)
        z = beta * h
        m = sigma(z / tau)
        return (1 - m) * sp(-z) + m * np.exp(-z)
    if name == "orpo":             # Hong et al. 2024: L_SFT + λ·L_OR, odds = P/(1-P) with P = exp(mean token log-prob)
        p_c, p_r = np.exp(pc / lc1), np.exp(pr / lr1)
        log_odds_ratio = np.log((p_c / (1 - p_c)) / (p_r / (1 - p_r)))
        return nll + beta * sp(-log_odds_ratio)
    if name == "cpo":              # Xu et al. 2024: -log σ(β log π(y_w) - β log π(y_l)) + α·NLL
        return _margin_loss(beta * (pc - pr), eps) + cpo_alpha * nll
    raise KeyError(name)


def numpy_kto(logratios, desirable, z0, *, beta, w_d=1.0, w_u=1.0):
    """KTO (Ethayarajh et al. 2024, Eq. 7): v = λ_D σ(β(r - z0)) for desirable answers, λ_U σ(β(z0 - r)) for
    undesirable ones, loss = λ_y - v (r = log π/π_ref of the answer)."""
    v = np.where(desirable, w_d * sigma(beta * (logratios - z0)), w_u * sigma(beta * (z0 - logratios)))
    return np.where(desirable, w_d, w_u) - v


def numpy_kto_reference_point(policy_mismatched, reference_mismatched):
    """z0 = max(0, mean of log π(y'|x) - log π_ref(y'|x)) over the mismatched pairs of the whole batch."""
    return max(0.0, float(np.mean(policy_mismatched - reference_mismatched)))


def numpy_apo_zero_unpaired(logratios, desirable, *, beta, w_d=1.0, w_u=1.0):
    """APO-zero per answer (D'Oosterlinck et al. 2024): desirable 1 - σ(βr), undesirable σ(βr)."""
    return np.where(desirable, w_d * (1 - sigma(beta * logratios)), w_u * sigma(beta * logratios))


def numpy_ld_logps(token_logps, shared_length: int, alpha: float):
    """LD-DPO (Liu et al. 2024): the first ℓ tokens at full weight, the rest (the verbose tail) times α."""
    token_logps = np.asarray(token_logps, dtype=float)
    return token_logps[:shared_length].sum() + alpha * token_logps[shared_length:].sum()


def numpy_wpo_weight(chosen_probs_rows, chosen_ids, rejected_probs_rows, rejected_ids):
    """WPO (Zhou et al. 2024) with TRL's normalisation, from full next-token distributions: for each answer,
    exp(mean_t log(p_t[y_t] / Σ_v p_t[v]²)); the pair's weight is the product of its two answers'."""
    def w(rows, ids):
        rows = np.asarray(rows, dtype=float)
        return np.exp(np.mean([np.log(r[i] / np.sum(r ** 2)) for r, i in zip(rows, ids)]))
    return w(chosen_probs_rows, chosen_ids) * w(rejected_probs_rows, rejected_ids)


def numeric_grad(f, x: np.ndarray, h: float = 1e-6) -> np.ndarray:
    """Central differences of the scalar function `f` at `x`, one entry at a time (float64)."""
    g = np.zeros_like(x)
    for i in range(x.size):
        up, down = x.copy(), x.copy()
        up[i] += h
        down[i] -= h
        g[i] = (f(up) - f(down)) / (2 * h)
    return g
