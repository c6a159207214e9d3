"""Tests for preftune.losses: every formula against values worked out by hand (test_losses_numpy.py checks
every registered loss, combinations and gradients against a float64 numpy implementation).

Notation: σ is the logistic function, sp(z) = log(1 + e^z) = -logσ(-z).
Reference numbers used below (6 decimals):
    ln2 = 0.693147, sp(-1) = -logσ(1) = 0.313262, sp(1) = -logσ(-1) = 1.313262,
    sp(-2) = -logσ(2) = 0.126928, sp(-1.5) = 0.201413, sp(0.5) = 0.974077,
    σ(1) = 0.731059, σ(-1) = 0.268941, σ(2) = 0.880797.
Useful identity: sp(z) - sp(-z) = z, so -(1-ε)logσ(z) - ε logσ(-z) = sp(-z) + ε·z.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from preftune.errors import PreftuneError
from preftune.losses import (
    LOSS_TYPES,
    REFERENCE_FREE,
    LossConfig,
    LossOutput,
    RewardShift,
    aot_loss,
    aot_unpaired_loss,
    apo_down_loss,
    apo_zero_loss,
    bco_pair_loss,
    cpo_loss,
    discopop_loss,
    dpop_loss,
    exo_pair_loss,
    f_divergence_scores,
    hinge_loss,
    ipo_loss,
    nca_pair_loss,
    orpo_loss,
    preference_loss,
    robust_loss,
    sft_loss,
    sigmoid_loss,
    sigmoid_norm_loss,
    simpo_loss,
    sppo_hard_loss,
)

LN2 = 0.693147
SP_M1 = 0.313262  # -logσ(1)
SP_P1 = 1.313262  # -logσ(-1)
SP_M2 = 0.126928  # -logσ(2)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def close(actual: torch.Tensor, expected: list[float] | torch.Tensor) -> None:
    """Compare with the 6-decimal hand values."""
    exp = expected if isinstance(expected, torch.Tensor) else torch.tensor(expected, dtype=actual.dtype)
    assert_close(actual, exp.to(actual.dtype), atol=1e-6, rtol=0)


def run(config: LossConfig, pc, pr, rc, rr, lc=None, lr=None, reward_shift: float = 0.0) -> LossOutput:
    ones = torch.ones_like(pc)
    return preference_loss(
        pc,
        pr,
        rc,
        rr,
        ones if lc is None else lc,
        ones if lr is None else lr,
        config,
        reward_shift=reward_shift,
    )


# --------------------------------------------------------------------------------------------- sigmoid


def test_sigmoid_hand_values():
    """β=0.5, h=[0, 2, -2]: βh=[0, 1, -1]; -logσ = [ln2, 0.313262, 1.313262]."""
    out = sigmoid_loss(t(0.0, 1.0, -1.0), t(0.0, -1.0, 1.0), beta=0.5)
    close(out, [LN2, SP_M1, SP_P1])


def test_sigmoid_step_one_identity():
    """policy == reference → every logratio 0 → loss ln2 = 0.693147 for each pair, rewards 0."""
    logps_c, logps_r = t(-12.5, -3.0, -40.0), t(-7.0, -9.25, -1.0)
    out = run(LossConfig(), logps_c, logps_r, logps_c.clone(), logps_r.clone())
    close(out.losses, [LN2, LN2, LN2])
    close(out.chosen_rewards, [0.0, 0.0, 0.0])
    close(out.rejected_rewards, [0.0, 0.0, 0.0])


def test_sigmoid_label_smoothing():
    """β=1, h=[1, 0], ε=0.1: 0.9·sp(-1) + 0.1·sp(1) = 0.313262 + 0.1 = 0.413262; h=0 → ln2 (symmetric)."""
    out = sigmoid_loss(t(1.0, 0.0), t(0.0, 0.0), beta=1.0, label_smoothing=0.1)
    close(out, [0.413262, LN2])
    via_config = run(
        LossConfig(label_smoothing=0.1, beta=1.0), t(1.0, 0.0), t(0.0, 0.0), t(0.0, 0.0), t(0.0, 0.0)
    )
    close(via_config.losses, [0.413262, LN2])


def test_sigmoid_is_stable_for_huge_margins():
    """β=1, h=±1000: -logσ(1000) ≈ 0 and -logσ(-1000) = 1000 exactly-ish; never inf/nan."""
    out = sigmoid_loss(t(1000.0, -1000.0), t(0.0, 0.0), beta=1.0)
    close(out, [0.0, 1000.0])


def test_dpo_gradient_matches_closed_form():
    """β=0.5, h=[0, 2, -2] (ε=0): dL/d pc = -β·σ(-βh), dL/d pr = +β·σ(-βh), reference gets none.

    σ(-βh) = σ([0, -1, 1]) = [0.5, 0.268941, 0.731059] → β·σ = [0.25, 0.134471, 0.365529].
    """
    pc = t(-1.0, 1.0, -3.0).requires_grad_()
    pr = t(-2.0, -2.0, -2.0).requires_grad_()
    rc, rr = t(-1.0, -1.0, -1.0), t(-2.0, -2.0, -2.0)  # chosen_logratios [0, 2, -2], rejected 0
    out = run(LossConfig(beta=0.5), pc, pr, rc, rr)
    out.losses.sum().backward()
    expected = [0.25, 0.134471, 0.365529]
    close(pc.grad, [-e for e in expected])
    close(pr.grad, expected)
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad
    # Rewards are β·logratios: 0.5·[0, 2, -2] and 0.5·[0, 0, 0].
    close(out.chosen_rewards, [0.0, 1.0, -1.0])
    close(out.rejected_rewards, [0.0, 0.0, 0.0])


# --------------------------------------------------------------------------------------------- robust


def test_robust_divides_by_one_minus_two_eps():
    """β=1, h=1, ε=0.1: [0.9·sp(-1) - 0.1·sp(1)] / 0.8 = (0.281936 - 0.131326)/0.8 = 0.188262.

    (= sp(-1) - 0.125, using sp(1) = sp(-1) + 1.)  At ε=0 robust equals sigmoid: h=[1, -2], β=1 →
    [0.313262, sp(2) = 2.126928].
    """
    close(robust_loss(t(1.0), t(0.0), beta=1.0, label_smoothing=0.1), [0.188262])
    close(robust_loss(t(1.0, -2.0), t(0.0, 0.0), beta=1.0), [SP_M1, 2.126928])
    out = run(
        LossConfig(loss_types=("robust",), beta=1.0, label_smoothing=0.1), t(1.0), t(0.0), t(0.0), t(0.0)
    )
    close(out.losses, [0.188262])


# --------------------------------------------------------------------------------------------- ipo


def test_ipo_length_normalised():
    """β=0.5 → 1/(2β) = 1.
    pair 1: c_lr=4, |c|=2 → 2;  r_lr=-3, |r|=3 → -1;  h_norm=3 → (3-1)² = 4
    pair 2: c_lr=0, r_lr=0, lengths 1 → h_norm=0 → (0-1)² = 1
    pair 3: c_lr=2, |c|=4 → 0.5; r_lr=-1, |r|=2 → -0.5; h_norm=1 → 0
    """
    c_lr, r_lr = t(4.0, 0.0, 2.0), t(-3.0, 0.0, -1.0)
    lc, lr = t(2.0, 1.0, 4.0), t(3.0, 1.0, 2.0)
    close(ipo_loss(c_lr, r_lr, lc, lr, beta=0.5), [4.0, 1.0, 0.0])
    zeros = t(0.0, 0.0, 0.0)
    out = run(LossConfig(loss_types=("ipo",), beta=0.5), c_lr, r_lr, zeros, zeros, lc, lr)
    close(out.losses, [4.0, 1.0, 0.0])


# --------------------------------------------------------------------------------------------- hinge


def test_hinge():
    """β=0.5, h=[0, 2, 4, -2]: 1 - βh = [1, 0, -1, 2] → relu = [1, 0, 0, 2]."""
    close(hinge_loss(t(0.0, 2.0, 3.0, -2.0), t(0.0, 0.0, -1.0, 0.0), beta=0.5), [1.0, 0.0, 0.0, 2.0])


# --------------------------------------------------------------------------------------------- sigmoid_norm


def test_sigmoid_norm():
    """β=0.5. pair 1: c_lr=4, |c|=4 → 1; r_lr=-2, |r|=2 → -1; h_norm=2; βh=1 → 0.313262.
    pair 2: c_lr=3, |c|=3 → 1; r_lr=5, |r|=5 → 1; h_norm=0 → ln2 (unnormalised h=-2 would give 1.313262).
    With ε=0.1, pair 1: sp(-1) + 0.1·1 = 0.413262; pair 2 stays ln2.
    """
    c_lr, r_lr, lc, lr = t(4.0, 3.0), t(-2.0, 5.0), t(4.0, 3.0), t(2.0, 5.0)
    close(sigmoid_norm_loss(c_lr, r_lr, lc, lr, beta=0.5), [SP_M1, LN2])
    close(sigmoid_norm_loss(c_lr, r_lr, lc, lr, beta=0.5, label_smoothing=0.1), [0.413262, LN2])


# --------------------------------------------------------------------------------------------- simpo


def test_simpo_reference_free():
    """β=2, γ=0.5.
    pair 1: pc=-4, |c|=4 → -1; pr=-6, |r|=3 → -2; margin 1; z = 2·1 - 0.5 = 1.5 → sp(-1.5) = 0.201413
    pair 2: pc=-2, |c|=2 → -1; pr=-1, |r|=1 → -1; margin 0; z = -0.5 → sp(0.5) = 0.974077
    Rewards β·p/|p|: chosen [-2, -2], rejected [-4, -2].  ε=0.2, pair 1: sp(-1.5) + 0.2·1.5 = 0.501413.
    """
    pc, pr, lc, lr = t(-4.0, -2.0), t(-6.0, -1.0), t(4.0, 2.0), t(3.0, 1.0)
    close(simpo_loss(pc, pr, lc, lr, beta=2.0, gamma=0.5), [0.201413, 0.974077])
    close(simpo_loss(pc[:1], pr[:1], lc[:1], lr[:1], beta=2.0, gamma=0.5, label_smoothing=0.2), [0.501413])
    config = LossConfig(loss_types=("simpo",), beta=2.0, simpo_gamma=0.5)
    assert not config.needs_reference
    out = preference_loss(pc, pr, None, None, lc, lr, config)
    close(out.losses, [0.201413, 0.974077])
    close(out.chosen_rewards, [-2.0, -2.0])
    close(out.rejected_rewards, [-4.0, -2.0])


# --------------------------------------------------------------------------------------------- apo


def test_apo_zero():
    """β=0.5. pair 1: c_lr=r_lr=0 → 1 - 0.5 + 0.5 = 1.
    pair 2: c_lr=2, r_lr=-2 → 1 - σ(1) + σ(-1) = 1 - 0.731059 + 0.268941 = 0.537883.
    """
    close(apo_zero_loss(t(0.0, 2.0), t(0.0, -2.0), beta=0.5), [1.0, 0.537883])


def test_apo_down():
    """β=0.5. pair 1: c=r=0 → σ(0) + 1 - σ(0) = 1.
    pair 2: c=2, r=-2, h=4 → σ(1) + 1 - σ(2) = 0.731059 + 1 - 0.880797 = 0.850262.
    """
    close(apo_down_loss(t(0.0, 2.0), t(0.0, -2.0), beta=0.5), [1.0, 0.850262])


# --------------------------------------------------------------------------------------------- nca


def test_nca_pair():
    """β=1. pair 1: c=r=0 → ln2 + ½ln2 + ½ln2 = 2ln2 = 1.386294.
    pair 2: c=1, r=-1 → sp(-1) + ½·sp(1) + ½·sp(-1) = 0.313262 + 0.656631 + 0.156631 = 1.126523.
    """
    close(nca_pair_loss(t(0.0, 1.0), t(0.0, -1.0), beta=1.0), [1.386294, 1.126523])


# --------------------------------------------------------------------------------------------- bco


def test_bco_pair_with_shift():
    """β=1, c=1, r=-1.  δ=0: -logσ(1) - logσ(1) = 2·0.313262 = 0.626523.
    δ=1: -logσ(1-1) - logσ(-(-1-1)) = ln2 + sp(-2) = 0.693147 + 0.126928 = 0.820075.
    """
    close(bco_pair_loss(t(1.0), t(-1.0), beta=1.0), [0.626523])
    close(bco_pair_loss(t(1.0), t(-1.0), beta=1.0, reward_shift=1.0), [0.820075])
    out = run(
        LossConfig(loss_types=("bco_pair",), beta=1.0), t(1.0), t(-1.0), t(0.0), t(0.0), reward_shift=1.0
    )
    close(out.losses, [0.820075])


def _fold(shift: RewardShift, *rewards: torch.Tensor) -> None:
    """One step's rewards into the shift, as the objective adds them (their float64 sum and count)."""
    for r in rewards:
        shift.add(float(r.double().sum()), r.numel())


def test_reward_shift_running_mean_and_resume():
    """add [1,2],[3,6] → 12/4 = 3;  add [0],[-4] → 8/6 = 1.333333.  Empty → 0."""
    shift = RewardShift()
    assert shift.value == 0.0
    _fold(shift, t(1.0, 2.0), t(3.0, 6.0))
    assert shift.value == pytest.approx(3.0)
    _fold(shift, t(0.0), t(-4.0))
    assert shift.value == pytest.approx(8.0 / 6.0)
    assert shift.state_dict() == {"sum": 8.0, "count": 6}

    resumed = RewardShift()
    resumed.load_state_dict(shift.state_dict())
    assert resumed.value == shift.value
    _fold(shift, t(10.0), t(0.5))
    _fold(resumed, t(10.0), t(0.5))
    assert resumed.state_dict() == shift.state_dict()
    assert resumed.value == pytest.approx((8.0 + 10.5) / 8.0)


def test_reward_shift_equals_plain_mean_over_all_elements():
    """Many uneven float32 batches: value equals torch's float64 mean of everything concatenated."""
    gen = torch.Generator().manual_seed(0)
    shift, seen = RewardShift(), []
    for n in (3, 1, 7, 4, 8):
        c = torch.randn(n, generator=gen) * 5 + 1
        r = torch.randn(n, generator=gen) * 5 - 1
        _fold(shift, c, r)
        seen += [c, r]
    assert shift.value == pytest.approx(torch.cat(seen).double().mean().item(), abs=1e-12)


# --------------------------------------------------------------------------------------------- dpop


def test_dpop():
    """β=1, λ=2.
    pair 1: pc=-1 > rc=-2 → penalty 0; c_lr=1, r_lr=-1, h=2 → sp(-2) = 0.126928 (plain DPO).
    pair 2: pc=-3 < rc=-2 → penalty 1; c_lr=-1, r_lr=-3, h=2; 2 - 2·1 = 0 → ln2.
    Default λ=50 on pair 2: 2 - 50 = -48 → 48 + sp(-48) ≈ 48.0.
    """
    pc, rc = t(-1.0, -3.0), t(-2.0, -2.0)
    c_lr, r_lr = pc - rc, t(-1.0, -3.0)
    close(dpop_loss(c_lr, r_lr, beta=1.0, dpop_lambda=2.0), [SP_M2, LN2])
    out = run(LossConfig(loss_types=("dpop",), beta=1.0, dpop_lambda=2.0), pc, r_lr, rc, t(0.0, 0.0))
    close(out.losses, [SP_M2, LN2])
    close(dpop_loss(c_lr, r_lr, beta=1.0), [SP_M2, 48.0])


# --------------------------------------------------------------------------------------------- issue 24's losses


def test_exo_pair():
    """β=1, h=0, ε=0.1: q = σ(0) = 0.5 → 0.5·(ln 0.5 - ln 0.9) + 0.5·(ln 0.5 - ln 0.1) = 0.5·ln(0.25/0.09) =
    0.510826. At q = 1-ε exactly (βh = ln 9: σ = 0.9) the KL is 0: EXO stops pushing the gap, DPO would not."""
    close(exo_pair_loss(t(0.0, math.log(9.0)), t(0.0, 0.0), beta=1.0, label_smoothing=0.1), [0.510826, 0.0])
    with pytest.raises(ValueError, match="0 < label_smoothing < 1"):
        exo_pair_loss(t(0.0), t(0.0), beta=1.0, label_smoothing=0.0)


def test_sppo_hard():
    """β=0.5 → targets ±1/(2β) = ±1: (c, r) = (1, -1) → 0; (0, 0) → 1 + 1 = 2; (2, 1) → 1 + 4 = 5."""
    close(sppo_hard_loss(t(1.0, 0.0, 2.0), t(-1.0, 0.0, 1.0), beta=0.5), [0.0, 2.0, 5.0])


def test_aot_matches_quantiles_not_pairs():
    """β=1. Policy margins pc-pr = [3, -1], reference margins rc-rr = [0, 2]: sorted [-1, 3] against [0, 2] →
    Δ = [-1, 1] → [sp(1), sp(-1)] = [1.313262, 0.313262]. Pair by pair (DPO) the gaps would be [3, -3]. The
    unpaired form sorts the log-ratios: chosen [2, -1], rejected [0, 1] → [-1, 2] - [0, 1] = Δ [-1, 1] too."""
    pc, pr, rc, rr = t(0.0, -4.0), t(-3.0, -3.0), t(-1.0, 0.0), t(-1.0, -2.0)
    close(aot_loss(pc, pr, rc, rr, beta=1.0), [SP_P1, SP_M1])
    close(aot_unpaired_loss(t(2.0, -1.0), t(0.0, 1.0), beta=1.0), [SP_P1, SP_M1])
    out = run(LossConfig(loss_types=("aot",), beta=1.0), pc, pr, rc, rr)
    close(out.losses, [SP_P1, SP_M1])
    close(out.chosen_rewards, [1.0, -4.0])  # rewards stay per pair: β·(pc - rc)


def test_discopop():
    """τ = 0.05, h = 0: m = σ(0) = 0.5 → 0.5·ln 2 + 0.5·e⁰ = 0.846574. β=1, h = -1000: m = σ(-20000) → the
    logistic part only, sp(1000) = 1000, finite (the product m·e^1000 would be 0·inf = NaN)."""
    close(discopop_loss(t(0.0), t(0.0), beta=0.1), [0.846574])
    close(discopop_loss(t(-1000.0), t(0.0), beta=1.0), [1000.0])


def test_orpo_by_hand():
    """λ = 0.1. Chosen: |c| = 2, pc = -2 ln 2 → mean log-prob -ln 2, P = 0.5, odds 1; rejected: |r| = 3,
    pr = -3 ln 4 → P = 0.25, odds 1/3. log odds ratio = ln 3 → L_OR = -logσ(ln 3) = ln(4/3) = 0.287682;
    L_SFT = ln 2 = 0.693147 → 0.693147 + 0.1·0.287682 = 0.721915. Reference-free: rewards β·p/|p|."""
    pc, pr, lc, lr = t(-2 * math.log(2.0)), t(-3 * math.log(4.0)), t(2.0), t(3.0)
    close(orpo_loss(pc, pr, lc, lr, lam=0.1), [0.721915])
    config = LossConfig(loss_types=("orpo",), beta=0.1)
    assert not config.needs_reference
    out = preference_loss(pc, pr, None, None, lc, lr, config)
    close(out.losses, [0.721915])
    close(out.chosen_rewards, [-0.1 * math.log(2.0)])


def test_orpo_stays_finite_when_an_answer_has_probability_one():
    """A mean log-prob that rounds to 0 (P = 1, infinite odds) is capped at -1e-6, log(1 - e^-1e-6) = -13.815511.
    Chosen at P = 1 against rejected P = 1/4: log odds ratio = (ln 4 - 1e-6) - (-13.815511 - ln 0.75) = 14.914
    → λ·L_OR = 0.1·3.3e-7, NLL 0 → 3.3e-8. Chosen P = 1/2 against rejected at P = 1: log odds ratio
    = -13.815510 → ln 2 + 0.1·13.815511 = 2.074698. Gradients finite in both (uncapped: NaN)."""
    for pc, pr in ((t(0.0), t(-3 * math.log(4.0))), (t(-2 * math.log(2.0)), t(0.0))):
        pc, pr = pc.requires_grad_(), pr.requires_grad_()
        loss = orpo_loss(pc, pr, t(2.0), t(3.0), lam=0.1)
        loss.sum().backward()
        assert torch.isfinite(loss).all() and torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()
    close(orpo_loss(t(0.0), t(-3 * math.log(4.0)), t(2.0), t(3.0), lam=0.1), [3.3e-8])
    close(orpo_loss(t(-2 * math.log(2.0)), t(0.0), t(2.0), t(3.0), lam=0.1), [2.074698])


def test_cpo_by_hand():
    """β = 0.5, pc = -1, pr = -3 → z = 1 → sp(-1) = 0.313262; NLL -pc/|c| = 0.5 (|c| = 2); α = 1 → 0.813262,
    α = 0 → the contrast alone; ε = 0.1 adds ε·z = 0.1."""
    pc, pr, lc = t(-1.0), t(-3.0), t(2.0)
    close(cpo_loss(pc, pr, lc, beta=0.5), [0.813262])
    close(cpo_loss(pc, pr, lc, beta=0.5, nll_weight=0.0), [SP_M1])
    close(cpo_loss(pc, pr, lc, beta=0.5, label_smoothing=0.1), [0.913262])
    out = preference_loss(pc, pr, None, None, lc, t(1.0), LossConfig(loss_types=("cpo",), beta=0.5))
    close(out.losses, [0.813262])


def test_f_divergence_scores_by_hand():
    """forward KL 1 - 1/u: u = 2 → 0.5; JS log(2u/(1+u)): u = 1 → 0, u = 3 → ln 1.5 = 0.405465;
    α-divergence (1 - u^-α)/α, α = 0.5: u = 4 → (1 - 0.5)/0.5 = 1; reverse KL is the log-ratio itself."""
    x = t(math.log(2.0), 0.0, math.log(3.0), math.log(4.0))
    close(f_divergence_scores(x, "forward_kl"), [0.5, 0.0, 2 / 3, 0.75])
    close(f_divergence_scores(x, "js_divergence")[1:3], [0.0, 0.405465])
    close(f_divergence_scores(x, "alpha_divergence", 0.5)[3:], [1.0])
    assert f_divergence_scores(x, "reverse_kl") is x
    huge = f_divergence_scores(t(-1000.0), "forward_kl")  # e^1000 would be inf; capped at e^80
    assert torch.isfinite(huge).all()
    with pytest.raises(ValueError, match="0 < alpha < 1"):
        f_divergence_scores(x, "alpha_divergence", 1.0)


def test_f_divergence_changes_the_dpo_loss():
    """β = 1, chosen log-ratio ln 2, rejected 0 under forward KL: scores 0.5 and 0 → -logσ(0.5) = 0.474077,
    where reverse KL (DPO) gives -logσ(ln 2) = ln(1.5) = 0.405465. Rewards stay β·log-ratio."""
    pc, pr, rc, rr = t(math.log(2.0)), t(0.0), t(0.0), t(0.0)
    out = run(LossConfig(beta=1.0, f_divergence_type="forward_kl"), pc, pr, rc, rr)
    close(out.losses, [0.474077])
    close(out.chosen_rewards, [math.log(2.0)])
    close(run(LossConfig(beta=1.0), pc, pr, rc, rr).losses, [0.405465])


# --------------------------------------------------------------------------------------------- sft / nll


def test_sft_weight_adds_per_token_nll():
    """β=1, policy == reference → sigmoid part ln2 per pair.
    pc=[-6, -1], |c|=[3, 4] → -pc/|c| = [2, 0.25]; α=0.5 → +[1, 0.125]; total [1.693147, 0.818147].
    """
    pc, pr, lc = t(-6.0, -1.0), t(-2.0, -5.0), t(3.0, 4.0)
    close(sft_loss(pc, lc), [2.0, 0.25])
    out = run(LossConfig(beta=1.0, sft_weight=0.5), pc, pr, pc.clone(), pr.clone(), lc=lc)
    close(out.losses, [1.693147, 0.818147])


# --------------------------------------------------------------------------------------------- combination


def test_simpo_combined_with_reference_loss_uses_reference_rewards():
    """simpo + sigmoid needs a reference; rewards are then β·logratios (β=1: [1] and [-1])."""
    config = LossConfig(loss_types=("simpo", "sigmoid"), beta=1.0)
    assert config.needs_reference
    out = run(config, t(-1.0), t(-3.0), t(-2.0), t(-2.0))
    close(out.chosen_rewards, [1.0])
    close(out.rejected_rewards, [-1.0])
    # simpo: margin -1 - (-3) = 2, z = 2 - 0.5 = 1.5 → 0.201413; sigmoid: h=2 → 0.126928.
    close(out.losses, [0.201413 + SP_M2])


def test_low_precision_inputs_are_computed_in_float32():
    """bf16 statistics are upcast: loss dtype float32, and policy == reference still gives ln2."""
    x = torch.tensor([-3.0, -5.0], dtype=torch.bfloat16)
    out = preference_loss(x, x, x, x, t(1.0, 1.0).float(), t(1.0, 1.0).float(), LossConfig())
    assert out.losses.dtype == torch.float32
    close(out.losses, [LN2, LN2])


# --------------------------------------------------------------------------------------------- config


def test_needs_reference():
    assert REFERENCE_FREE == frozenset({"simpo", "orpo", "cpo"})
    assert "sft" not in LOSS_TYPES
    assert LossConfig().needs_reference
    assert not LossConfig(loss_types=("simpo",)).needs_reference
    assert LossConfig(loss_types=("simpo", "dpop")).needs_reference


def test_missing_reference_raises_value_error():
    with pytest.raises(ValueError, match="reference"):
        preference_loss(t(-1.0), t(-2.0), None, None, t(1.0), t(1.0), LossConfig())


def test_shape_mismatch_raises_value_error():
    with pytest.raises(ValueError, match="shape"):
        preference_loss(
            t(-1.0, -2.0), t(-2.0), t(-1.0, -2.0), t(-2.0, -1.0), t(1.0, 1.0), t(1.0, 1.0), LossConfig()
        )


def test_config_normalises_lists_and_strings():
    config = LossConfig(loss_types=["sigmoid", "ipo"], loss_weights=[1, 2])  # type: ignore[arg-type]
    assert config.loss_types == ("sigmoid", "ipo") and config.loss_weights == (1.0, 2.0)
    assert LossConfig(loss_types="hinge").loss_types == ("hinge",)  # type: ignore[arg-type]
    assert hash(config) == hash(LossConfig(loss_types=("sigmoid", "ipo"), loss_weights=(1.0, 2.0)))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"beta": 0.0}, r"beta must be > 0.*closer to the reference.*0\.1"),
        ({"beta": -0.1}, "beta must be > 0"),
        ({"beta": float("nan")}, "beta must be a finite number"),
        ({"label_smoothing": 0.5}, r"label_smoothing must be in \[0, 0\.5\)"),
        ({"label_smoothing": -0.1}, r"label_smoothing must be in \[0, 0\.5\)"),
        ({"loss_types": ("ipo",), "label_smoothing": 0.1}, "no effect on loss type.*ipo"),
        ({"loss_types": ("sigmoid", "hinge"), "label_smoothing": 0.1}, "no effect on loss type.*hinge"),
        ({"loss_types": ("sigmod",)}, "Unknown loss type 'sigmod'; did you mean 'sigmoid'"),
        ({"loss_types": ()}, "loss_types is empty"),
        ({"loss_types": ("sft",)}, "sft_weight"),
        ({"loss_types": ("sigmoid", "sigmoid")}, "more than once"),
        (
            {"loss_types": ("sigmoid", "ipo"), "loss_weights": (1.0,)},
            "loss_weights has 1 entries but loss_types has 2",
        ),
        ({"loss_weights": (-1.0,)}, "loss_weights must all be >= 0"),
        ({"sft_weight": -0.5}, "sft_weight must be >= 0"),
        ({"dpop_lambda": -1.0}, "dpop_lambda must be >= 0"),
        ({"loss_types": ("exo_pair",)}, r"exo_pair needs label_smoothing > 0.*1e-3"),
        ({"discopop_tau": 0.0}, "discopop_tau must be > 0"),
        ({"cpo_alpha": -1.0}, "cpo_alpha must be >= 0"),
        ({"f_alpha_divergence_coef": 1.0}, r"f_alpha_divergence_coef must be in \(0, 1\).*forward_kl"),
        ({"f_alpha_divergence_coef": 0.0}, r"f_alpha_divergence_coef must be in \(0, 1\) \(got 0"),
        ({"f_divergence_type": "forward_k"}, "f_divergence_type must be one of.*did you mean 'forward_kl'"),
        ({"loss_types": ("sigmoid", "apo_zero"), "f_divergence_type": "js_divergence"},
         "js_divergence does not apply to apo_zero .*sigmoid, robust"),
    ],
)
def test_config_validation_errors(kwargs, match):
    with pytest.raises(PreftuneError, match=match):
        LossConfig(**kwargs)


@pytest.mark.parametrize("loss_type", ["sigmoid", "robust", "sigmoid_norm", "simpo"])
def test_label_smoothing_allowed_where_used(loss_type):
    assert LossConfig(loss_types=(loss_type,), label_smoothing=0.2).label_smoothing == 0.2


def test_a_registered_loss_is_usable_by_name():
    """Adding a loss is one function plus one `register`: the config accepts the name, `preference_loss`
    dispatches to it, and its properties drive needs_reference. Here a reference-free 'margin' loss
    relu(1 - (pc - pr)): pc = [-1, -3], pr = [-2, -1] → margins [1, -2] → losses [0, 3]."""
    from preftune.losses import LOSSES, register

    spec = register("test_margin", reference_free=True,
                    compute=lambda s, c: torch.relu(1.0 - (s.policy_chosen_logps - s.policy_rejected_logps)))
    try:
        assert spec.name == "test_margin" and LOSSES["test_margin"] is spec
        config = LossConfig(loss_types=("test_margin",))
        assert not config.needs_reference
        t = torch.tensor
        out = preference_loss(t([-1.0, -3.0]), t([-2.0, -1.0]), None, None, t([1.0, 1.0]), t([1.0, 1.0]), config)
        torch.testing.assert_close(out.losses, t([0.0, 3.0]))
        with pytest.raises(ValueError, match="already registered"):
            register("test_margin", lambda s, c: s.policy_chosen_logps)
    finally:
        LOSSES.pop("test_margin")
    with pytest.raises(PreftuneError, match="Unknown loss type 'test_margin'"):
        LossConfig(loss_types=("test_margin",))


def test_readme_lists_every_registered_loss():
    """The README's loss table is the user's list of `--loss` names: it must match the registry."""
    import re
    from pathlib import Path

    from preftune.losses import LOSSES

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### Losses", 1)[1].split("\n### ", 1)[0]
    rows = [ln for ln in section.splitlines() if ln.startswith("| `")]
    documented = {name for ln in rows for name in re.findall(r"`(\w+)`", ln.split("|")[1])}
    assert documented == set(LOSSES)


# --------------------------------------------------------------------------------------------- edges (mutation)


def test_registry_names_match_their_keys():
    from preftune.losses import LOSSES

    assert all(spec.name == name for name, spec in LOSSES.items())


def test_bco_shift_defaults_to_zero():
    """Called without a reward shift, BCO uses δ = 0: β=1, c=1, r=-1 → 2·sp(-1) = 0.626523."""
    config = LossConfig(loss_types=("bco_pair",), beta=1.0)
    out = preference_loss(t(1.0), t(-1.0), t(0.0), t(0.0), t(1.0), t(1.0), config)
    close(out.losses, [0.626523])


@pytest.mark.parametrize("missing", ["chosen", "rejected"])
def test_one_missing_reference_side_raises(missing):
    rc, rr = (None, t(-2.0)) if missing == "chosen" else (t(-1.0), None)
    with pytest.raises(ValueError, match="need reference_chosen_logps and reference_rejected_logps"):
        preference_loss(t(-1.0), t(-2.0), rc, rr, t(1.0), t(1.0), LossConfig())


@pytest.mark.parametrize("eps", [0.5, 0.7, -0.1])
def test_robust_refuses_eps_outside_0_to_half(eps):
    """1 - 2ε would be 0 (a division by zero) or negative (a sign flip)."""
    with pytest.raises(ValueError, match="0 <= label_smoothing < 0.5"):
        robust_loss(t(1.0), t(0.0), beta=1.0, label_smoothing=eps)


@pytest.mark.parametrize("bad", range(6))
def test_shape_error_names_the_argument(bad):
    """B comes from policy_chosen_logps; each other argument of 3 entries instead of 2 is named. The first is
    named when it is not 1-D ([1, 2])."""
    names = ["policy_chosen_logps", "policy_rejected_logps", "reference_chosen_logps", "reference_rejected_logps",
             "chosen_lengths", "rejected_lengths"]
    args = [t(-1.0, -2.0) for _ in names]
    args[bad] = t(-1.0, -2.0, -3.0) if bad else t(-1.0, -2.0)[None]
    with pytest.raises(ValueError, match=f"^{names[bad]} must have shape"):
        preference_loss(*args, LossConfig())


def test_config_edges():
    """A scalar weight for one loss, a zero weight (a loss switched off), a non-number weight named, and an
    unknown loss with no close name gets no hint."""
    assert LossConfig(loss_types="sigmoid", loss_weights=2).loss_weights == (2.0,)  # type: ignore[arg-type]
    assert LossConfig(loss_types=("sigmoid", "ipo"), loss_weights=(1.0, 0.0)).weights == (1.0, 0.0)
    with pytest.raises(PreftuneError, match="^each of loss_weights must be a number, got 'x'"):
        LossConfig(loss_weights=("x",))  # type: ignore[arg-type]
    with pytest.raises(PreftuneError, match="^Unknown loss type 'zzzz'; valid loss types are: sigmoid, "):
        LossConfig(loss_types=("zzzz",))


def test_config_numbers_are_converted_and_named():
    """YAML or flags may give numbers as strings or ints: each becomes a float on the config; a non-number is
    refused naming its key. λ = 0 and λ = 0.5 are valid (no or a mild DPOP penalty)."""
    cfg = LossConfig(loss_types=("sigmoid",), beta="0.5", label_smoothing="0.1", simpo_gamma=1, dpop_lambda="2",
                     sft_weight=1)  # type: ignore[arg-type]
    values = (cfg.beta, cfg.label_smoothing, cfg.simpo_gamma, cfg.dpop_lambda, cfg.sft_weight)
    assert values == (0.5, 0.1, 1.0, 2.0, 1.0) and all(type(v) is float for v in values)
    assert LossConfig(dpop_lambda=0).dpop_lambda == 0.0 and LossConfig(dpop_lambda=0.5).dpop_lambda == 0.5
    for key in ("beta", "label_smoothing", "simpo_gamma", "dpop_lambda", "sft_weight"):
        with pytest.raises(PreftuneError, match=f"^{key} must be a number, got 'abc'"):
            LossConfig(**{key: "abc"})


@pytest.mark.parametrize(("loss", "reference", "reference_model", "match"), [
    ("orpo", "copy", None, r"^reference 'copy' has no use with loss orpo: it needs no reference model"),
    ("simpo+cpo", "precomputed", None, "reference 'precomputed' has no use with loss simpo\\+cpo"),
    ("cpo", "auto", "some/model", "^reference_model has no use with loss cpo"),
])
def test_reference_settings_that_cannot_apply_are_refused(loss, reference, reference_model, match):
    """A reference-free loss loads no reference, so naming one would be silently ignored. A mixture that needs
    one takes any strategy; `none` is fine for a reference-free loss (the objective refuses it for the others)."""
    with pytest.raises(PreftuneError, match=match):
        LossConfig(loss_types=tuple(loss.split("+"))).check_reference(reference, reference_model)
    LossConfig(loss_types=("sigmoid", "orpo")).check_reference("copy")
    LossConfig(loss_types=("orpo",)).check_reference("none")
    LossConfig(loss_types=("sigmoid",)).check_reference("none")
