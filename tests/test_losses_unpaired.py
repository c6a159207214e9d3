"""The formulas of issue 24's second phase (KTO and APO-zero on unpaired examples, LD-DPO's log-probs, WPO's
weights): values against tests/independent.py's numpy versions from the papers, gradients against central
differences, and the hand-checkable identities."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from independent import (
    numpy_apo_zero_unpaired,
    numpy_kto,
    numpy_kto_reference_point,
    numpy_ld_logps,
    numpy_wpo_weight,
)

from preftune.logprobs import token_logps
from preftune.losses.transforms import ld_logps, wpo_weights
from preftune.losses.unpaired import (
    apo_zero_unpaired_loss,
    kto_loss,
    kto_reference_point,
)


def _unpaired(seed: int, n: int = 7):
    rng = np.random.default_rng(seed)
    logratios = rng.normal(0.0, 3.0, n)
    desirable = rng.random(n) < 0.5
    desirable[:2] = [True, False]  # both kinds in every draw
    return logratios, desirable


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kto_and_apo_zero_unpaired_equal_numpy(seed):
    """β = 0.3, λ_D = 1.5, λ_U = 0.7, z0 from the mismatched pairs' mean log-ratio (1.1 here), to 1e-12."""
    lr, des = _unpaired(seed)
    rng = np.random.default_rng(seed + 10)
    pol, ref = rng.normal(-20, 3, 9), rng.normal(-21.1, 3, 9)
    z0 = kto_reference_point(float((pol - ref).sum()), 9)
    assert float(z0) == pytest.approx(numpy_kto_reference_point(pol, ref), abs=1e-12)
    t, d = torch.tensor(lr, dtype=torch.float64), torch.tensor(des)
    got = kto_loss(t, d, z0, beta=0.3, desirable_weight=1.5, undesirable_weight=0.7)
    want = numpy_kto(lr, des, float(z0), beta=0.3, w_d=1.5, w_u=0.7)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12, err_msg=f"seed={seed}")
    got = apo_zero_unpaired_loss(t, d, beta=0.3, desirable_weight=1.5, undesirable_weight=0.7)
    np.testing.assert_allclose(got.numpy(), numpy_apo_zero_unpaired(lr, des, beta=0.3, w_d=1.5, w_u=0.7),
                               rtol=1e-12, atol=1e-12, err_msg=f"seed={seed}")


def test_kto_gradients_and_reference_point():
    """Autograd vs central differences of the numpy formula (z0 held fixed: it carries no gradient); z0 is
    clamped at 0 (a negative KL estimate is noise) and never requires a gradient; at policy = reference every
    loss is λ/2 (the step-1 identity of the issue)."""
    lr, des = _unpaired(3)
    x = torch.tensor(lr, requires_grad=True)
    kto_loss(x, torch.tensor(des), 0.4, beta=0.5, desirable_weight=2.0).sum().backward()
    h, num = 1e-6, np.zeros_like(lr)
    for i in range(lr.size):
        up, down = lr.copy(), lr.copy()
        up[i] += h
        down[i] -= h
        f_up, f_down = (numpy_kto(v, des, 0.4, beta=0.5, w_d=2.0).sum() for v in (up, down))
        num[i] = (f_up - f_down) / (2 * h)
    np.testing.assert_allclose(x.grad.numpy(), num, rtol=1e-6, atol=1e-8)
    assert float(kto_reference_point(-5.0, 2)) == 0.0
    assert not kto_reference_point(torch.tensor(3.0, requires_grad=True), 2).requires_grad
    zeros = torch.zeros(4, dtype=torch.float64)
    d = torch.tensor([True, True, False, False])
    torch.testing.assert_close(kto_loss(zeros, d, kto_reference_point(0.0, 4), beta=0.1, desirable_weight=1.0,
                                        undesirable_weight=1.33),
                               torch.tensor([0.5, 0.5, 0.665, 0.665], dtype=torch.float64))
    with pytest.raises(ValueError, match="at least one mismatched pair"):
        kto_reference_point(1.0, 0)


def test_ld_logps_equal_numpy():
    """Answer token log-probs [-1, -2, -3, -4, -5], shared length 2 (the shorter answer's), α = 0.25:
    -3 + 0.25·(-12) = -6; α = 1 is the plain sum -15, α = 0 keeps the shared part -3."""
    tok = np.array([-1.0, -2.0, -3.0, -4.0, -5.0])
    shared, total = torch.tensor([-3.0]), torch.tensor([-15.0])
    for alpha in (0.25, 1.0, 0.0):
        assert float(ld_logps(shared, total, alpha)) == pytest.approx(numpy_ld_logps(tok, 2, alpha))


def test_wpo_weights_equal_numpy_from_full_distributions():
    """Random logits for a 3-token chosen and a 2-token rejected answer over 11 tokens: the weight from the
    per-token statistic (one extra logsumexp per token) equals exp(mean log(p[y]/Σp²)) of each answer, multiplied,
    computed from the probabilities themselves; no gradient flows into it."""
    gen = torch.Generator().manual_seed(0)
    lc, lr = (torch.randn(n, 11, generator=gen, dtype=torch.float64) for n in (3, 2))
    yc, yr = torch.tensor([4, 0, 9]), torch.tensor([2, 2])
    lc.requires_grad_()
    (pc, cc), (pr, cr) = (token_logps(None, lg, y, True, 0, collision=True) for lg, y in ((lc, yc), (lr, yr)))
    ac, ar = (pc.detach() - cc).sum(), (pr - cr).sum()
    assert not cc.requires_grad
    w = wpo_weights(ac[None], torch.tensor([3.0]), ar[None], torch.tensor([2.0]))
    want = numpy_wpo_weight(torch.softmax(lc, -1).detach().numpy(), yc.numpy(), torch.softmax(lr, -1).numpy(),
                            yr.numpy())
    assert float(w) == pytest.approx(want, rel=1e-6)
    assert not w.requires_grad


@pytest.mark.parametrize("seed", [4, 5, 6])
def test_unpaired_loss_mixture_equals_numpy_with_gradients(seed):
    """`unpaired_loss` (the dispatch training uses) for 0.6·kto + 1.3·apo_zero_unpaired, β = 0.4, λ_D = 1.2,
    λ_U = 0.9, z0 = 0.25: per example to 1e-12; d(Σ loss)/d(policy log-probs) against central differences of the
    numpy formulas (z0 held: it carries no gradient), 1e-6; the rewards are β·log π/π_ref, detached."""
    from preftune.losses import LossConfig, unpaired_loss

    rng = np.random.default_rng(seed)
    pol, ref = rng.normal(-20, 3, 7), rng.normal(-20, 3, 7)
    des = rng.random(7) < 0.5
    des[:2] = [True, False]
    cfg = LossConfig(loss_types=("kto", "apo_zero_unpaired"), loss_weights=(0.6, 1.3), beta=0.4,
                     desirable_weight=1.2, undesirable_weight=0.9)

    def want(p):
        kw = dict(beta=0.4, w_d=1.2, w_u=0.9)
        return 0.6 * numpy_kto(p - ref, des, 0.25, **kw) + 1.3 * numpy_apo_zero_unpaired(p - ref, des, **kw)

    x = torch.tensor(pol, requires_grad=True)
    losses, rewards = unpaired_loss(x, torch.tensor(ref), torch.tensor(des), cfg, 0.25)
    np.testing.assert_allclose(losses.detach().numpy(), want(pol), rtol=1e-12, atol=1e-12, err_msg=f"seed={seed}")
    np.testing.assert_allclose(rewards.numpy(), 0.4 * (pol - ref), rtol=1e-12)
    losses.sum().backward()
    num = np.array([(want(pol + h).sum() - want(pol - h).sum()) / 2e-6 for h in np.eye(7) * 1e-6])
    np.testing.assert_allclose(x.grad.numpy(), num, rtol=1e-6, atol=1e-8, err_msg=f"seed={seed}")
