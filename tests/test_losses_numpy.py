"""`preference_loss` against a second implementation in float64 numpy, written from the papers' formulas
(tests/independent.py, not from preftune's code), and its gradients against numpy central differences.

Inputs are drawn from a seeded generator; the seed is in every assertion message, so a failure replays.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from independent import numeric_grad, numpy_losses

from preftune.losses import (
    LOSS_TYPES,
    LOSSES,
    REFERENCE_FREE,
    LossConfig,
    preference_loss,
)

F_LOSSES = [n for n, spec in LOSSES.items() if spec.f_divergence]
PAIRED = [n for n in LOSS_TYPES if not LOSSES[n].unpaired]  # the unpaired ones: tests/test_losses_unpaired.py
# Each option at a value away from its default, so a formula that ignored it would fail.
OPTIONS = dict(beta=0.3, gamma=0.4, lam=3.0, shift=0.7, tau=0.3, cpo_alpha=0.6)


def _inputs(seed: int, n: int = 5):
    rng = np.random.default_rng(seed)
    pc, pr, rc, rr = (rng.normal(-20.0, 4.0, n) for _ in range(4))
    lc, lr = rng.integers(1, 30, n).astype(float), rng.integers(1, 30, n).astype(float)
    return pc, pr, rc, rr, lc, lr


def _torch(*arrays):
    return [torch.tensor(a, dtype=torch.float64) for a in arrays]


def _config(name: str, eps: float, **extra) -> LossConfig:
    o = OPTIONS
    return LossConfig(loss_types=(name,), beta=o["beta"], label_smoothing=eps, simpo_gamma=o["gamma"],
                      dpop_lambda=o["lam"], discopop_tau=o["tau"], cpo_alpha=o["cpo_alpha"], **extra)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name", PAIRED)
def test_each_loss_equals_numpy(name, seed):
    """Each registered loss at β=0.3 (ε=0.2 where it has label smoothing, δ=0.7 for BCO, λ=3 for DPOP so the
    penalty does not swamp the rest, τ=0.3 for DiscoPOP, α=0.6 for CPO's NLL), per pair, to 1e-10 (both float64;
    the formulas differ only in rounding)."""
    pc, pr, rc, rr, lc, lr = _inputs(seed)
    eps = 0.2 if LOSSES[name].label_smoothing else 0.0
    out = preference_loss(*_torch(pc, pr, rc, rr, lc, lr), _config(name, eps), reward_shift=0.7)
    want = numpy_losses(name, pc, pr, rc, rr, lc, lr, eps=eps, **OPTIONS)
    np.testing.assert_allclose(out.losses.numpy(), want, rtol=1e-10, atol=1e-10, err_msg=f"{name} seed={seed}")
    if name in REFERENCE_FREE:  # implicit rewards β·p/|p|
        np.testing.assert_allclose(out.chosen_rewards.numpy(), 0.3 * pc / lc, rtol=1e-12, err_msg=f"seed={seed}")
        np.testing.assert_allclose(out.rejected_rewards.numpy(), 0.3 * pr / lr, rtol=1e-12, err_msg=f"seed={seed}")
    else:
        np.testing.assert_allclose(out.chosen_rewards.numpy(), 0.3 * (pc - rc), rtol=1e-12, err_msg=f"seed={seed}")
        np.testing.assert_allclose(out.rejected_rewards.numpy(), 0.3 * (pr - rr), rtol=1e-12, err_msg=f"seed={seed}")


def _small_logratio_inputs(seed: int, n: int = 5):
    """f-DPO scores exponentiate the log-ratios: keep them within ±3 (a policy near its reference), where
    e^(±3α) is far from the cap at e^80, and the answers' log-probs where they are."""
    pc, pr, rc, rr, lc, lr = _inputs(seed, n)
    rng = np.random.default_rng(seed + 100)
    return pc, pr, pc - rng.uniform(-3, 3, n), pr - rng.uniform(-3, 3, n), lc, lr


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("divergence", ["forward_kl", "js_divergence", "alpha_divergence"])
def test_f_divergences_equal_numpy(divergence, seed):
    """f-DPO: every loss that supports it, with f'(u) from the paper's Table 1 (independent.f_prime) in place of
    log u; α = 0.3 (not TRL's default 0.5, where α and 1 - α coincide), all to 1e-10."""
    pc, pr, rc, rr, lc, lr = _small_logratio_inputs(seed)
    for name in F_LOSSES:
        eps = 0.2 if LOSSES[name].label_smoothing else 0.0
        cfg = _config(name, eps, f_divergence_type=divergence, f_alpha_divergence_coef=0.3)
        out = preference_loss(*_torch(pc, pr, rc, rr, lc, lr), cfg)
        want = numpy_losses(name, pc, pr, rc, rr, lc, lr, eps=eps, divergence=divergence, alpha=0.3, **OPTIONS)
        np.testing.assert_allclose(out.losses.numpy(), want, rtol=1e-10, atol=1e-10,
                                   err_msg=f"{name} {divergence} seed={seed}")


@pytest.mark.parametrize("seed", [3, 4])
def test_weighted_combination_plus_sft_equals_numpy(seed):
    """MPO-style: 0.7·sigmoid + 1.3·ipo + 0.25·bco_pair + 0.5·orpo + 0.8·aot + α·(-pc/|c|) with α = 0.4 (RPO),
    per pair: the new losses mix with the old ones (orpo brings its own NLL, which adds to the RPO term)."""
    pc, pr, rc, rr, lc, lr = _inputs(seed)
    names, weights = ("sigmoid", "ipo", "bco_pair", "orpo", "aot"), (0.7, 1.3, 0.25, 0.5, 0.8)
    cfg = LossConfig(loss_types=names, loss_weights=weights, beta=0.2, sft_weight=0.4)
    out = preference_loss(*_torch(pc, pr, rc, rr, lc, lr), cfg, reward_shift=-0.3)
    want = sum(w * numpy_losses(n, pc, pr, rc, rr, lc, lr, beta=0.2, shift=-0.3) for n, w in zip(names, weights))
    want = want + 0.4 * (-pc / lc)
    np.testing.assert_allclose(out.losses.numpy(), want, rtol=1e-10, atol=1e-10, err_msg=f"seed={seed}")


def _check_gradients(name: str, seed: int, inputs, **config_extra) -> None:
    pc, pr, rc, rr, lc, lr = inputs
    eps = 0.1 if LOSSES[name].label_smoothing else 0.0
    kw = dict(eps=eps, **OPTIONS)
    cfg = _config(name, eps, **config_extra)
    if "f_divergence_type" in config_extra:
        kw.update(divergence=config_extra["f_divergence_type"], alpha=config_extra.get("f_alpha_divergence_coef", 0.5))
    tpc, tpr, trc, trr, tlc, tlr = _torch(pc, pr, rc, rr, lc, lr)
    tpc.requires_grad_()
    tpr.requires_grad_()
    preference_loss(tpc, tpr, trc, trr, tlc, tlr, cfg, reward_shift=0.7).losses.sum().backward()
    gc = numeric_grad(lambda x: numpy_losses(name, x, pr, rc, rr, lc, lr, **kw).sum(), pc)
    gr = numeric_grad(lambda x: numpy_losses(name, pc, x, rc, rr, lc, lr, **kw).sum(), pr)
    np.testing.assert_allclose(tpc.grad.numpy(), gc, atol=1e-6, rtol=1e-6, err_msg=f"{name} chosen seed={seed}")
    np.testing.assert_allclose(tpr.grad.numpy(), gr, atol=1e-6, rtol=1e-6, err_msg=f"{name} rejected seed={seed}")


@pytest.mark.parametrize("name", PAIRED)
def test_gradients_equal_numpy_central_differences(name):
    """d(Σ loss)/d(policy log-probs) by autograd vs central differences of the numpy formula (h = 1e-6 in
    float64: truncation ~h²·f''' and rounding ~1e-16/h, both far under the 1e-6 tolerance), two seeds. Seeded
    inputs sit away from the kinks of hinge and DPOP and from ties in AOT's sorts (random reals hit one with
    probability 0)."""
    for seed in (5, 6):
        _check_gradients(name, seed, _inputs(seed))


@pytest.mark.parametrize("divergence", ["forward_kl", "js_divergence", "alpha_divergence"])
def test_f_divergence_gradients_equal_numpy(divergence):
    """The same check through f'(u) (sigmoid, ipo and discopop stand for the reward-gap losses), α = 0.3."""
    for name in ("sigmoid", "ipo", "discopop"):
        _check_gradients(name, 7, _small_logratio_inputs(7), f_divergence_type=divergence,
                         f_alpha_divergence_coef=0.3)
