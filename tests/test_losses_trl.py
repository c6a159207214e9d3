"""Parity with TRL 1.16 on fixed log-probs: every loss TRL's DPOTrainer shares with preftune, its f-divergences,
and ORPO's and CPO's preference terms, values and gradients. Skipped when `trl` is not installed (the `bench`
extra installs it; importing it takes ~6 CPU-seconds).

TRL's DPOTrainer computes its loss inside `_compute_loss(model, inputs)` from a forward's per-token log-probs; the
harness below calls that method on a stand-in trainer and a stand-in model whose "forward" returns per-token
log-probs that sum to the given statistics, with the reference log-probs as precomputed columns. Nothing of
TRL is patched: the code that runs is TRL's own loss code.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from preftune.losses import LossConfig, cpo_loss, odds_ratio_loss, preference_loss, sft_loss

pytest.importorskip("trl", minversion="1.16", reason="trl >= 1.16 is not installed (pip install '.[bench]')")
dpo_trainer = pytest.importorskip("trl.trainer.dpo_trainer")
orpo_trainer = pytest.importorskip("trl.experimental.orpo.orpo_trainer")
cpo_trainer = pytest.importorskip("trl.experimental.cpo.cpo_trainer")

SHARED = ["sigmoid", "hinge", "ipo", "robust", "sigmoid_norm", "apo_zero", "apo_down", "nca_pair", "bco_pair",
          "exo_pair", "sppo_hard", "aot", "aot_unpaired", "discopop"]
F_SHARED = ["sigmoid", "hinge", "ipo", "robust", "sigmoid_norm", "exo_pair", "discopop"]
# TRL 1.16's sigmoid ignores label_smoothing; EXO needs ε > 0 (the paper's 1e-3); AOT and rDPO read it.
EPS = {"exo_pair": 1e-3, "aot": 0.1, "aot_unpaired": 0.1, "robust": 0.1}


class _OneProcess:
    device = torch.device("cpu")

    def gather(self, x):
        return x

    gather_for_metrics = gather


def _stats(seed: int, n: int = 6):
    """float32 summed log-probs around -20 with log-ratios within ±3, answer lengths 1..12."""
    rng = np.random.default_rng(seed)
    pc, pr = rng.normal(-20, 4, n), rng.normal(-20, 4, n)
    rc, rr = pc - rng.uniform(-3, 3, n), pr - rng.uniform(-3, 3, n)
    lc, lr = rng.integers(1, 13, n), rng.integers(1, 13, n)
    return [torch.tensor(a, dtype=torch.float32) for a in (pc, pr, rc, rr)], lc, lr


def trl_dpo(pc, pr, rc, rr, lc, lr, *, loss_type: str, beta: float, eps: float = 0.0,
            divergence: str = "reverse_kl", alpha: float = 0.5, tau: float = 0.05):
    """TRL's DPO loss (batch mean) and its gradient with respect to each answer's summed policy log-prob."""
    n, width = len(lc), int(max(lc.max(), lr.max()))
    lengths = np.concatenate([lc, lr])
    mask = torch.zeros(2 * n, width + 1, dtype=torch.long)  # one prompt token, then the answer
    per_token = torch.zeros(2 * n, width)
    for row, (length, total) in enumerate(zip(lengths, torch.cat([pc, pr]).tolist())):
        mask[row, 1:1 + length] = 1
        per_token[row, :length] = total / length
    per_token.requires_grad_()
    outputs = SimpleNamespace(log_probs=per_token, entropy=torch.zeros_like(per_token),
                              mean_logits=torch.zeros_like(per_token), is_top1=torch.zeros_like(mask[:, 1:]).bool())
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=_OneProcess(), aux_loss_enabled=False,
        precompute_ref_logps=True, ld_alpha=None, use_weighting=False, loss_types=[loss_type], loss_weights=[1.0],
        beta=beta, label_smoothing=eps, f_divergence_type=divergence, f_alpha_divergence_coef=alpha,
        args=SimpleNamespace(discopop_tau=tau, gradient_checkpointing_kwargs=None),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros_like(mask), "attention_mask": torch.ones_like(mask), "completion_mask": mask,
              "ref_chosen_logps": rc, "ref_rejected_logps": rr}
    loss = dpo_trainer.DPOTrainer._compute_loss(trainer, lambda **kw: outputs, inputs, False)
    (grad,) = torch.autograd.grad(loss, per_token)
    return float(loss.detach()), grad[:, 0].reshape(2, n)  # every token of an answer gets d loss / d (its sum)


def ours(pc, pr, rc, rr, lc, lr, config: LossConfig):
    x, y = pc.clone().requires_grad_(), pr.clone().requires_grad_()
    loss = preference_loss(x, y, rc, rr, torch.tensor(lc, dtype=torch.float32),
                           torch.tensor(lr, dtype=torch.float32), config).losses.mean()
    gx, gy = torch.autograd.grad(loss, (x, y))
    return float(loss.detach()), torch.stack([gx, gy])


@pytest.mark.parametrize("seed", [0, 1])
def test_dpo_family_matches_trl(seed):
    """Every loss type both have, β = 0.3 (τ = 0.3 for DiscoPOP): batch-mean loss and gradients to 1e-5 (float32)."""
    (pc, pr, rc, rr), lc, lr = _stats(seed)
    for name in SHARED:
        eps = EPS.get(name, 0.0)
        want, want_grad = trl_dpo(pc, pr, rc, rr, lc, lr, loss_type=name, beta=0.3, eps=eps, tau=0.3)
        got, grad = ours(pc, pr, rc, rr, lc, lr, LossConfig(loss_types=(name,), beta=0.3, label_smoothing=eps,
                                                            discopop_tau=0.3))
        assert got == pytest.approx(want, rel=1e-5, abs=1e-6), name
        torch.testing.assert_close(grad, want_grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("divergence", ["forward_kl", "js_divergence", "alpha_divergence"])
def test_f_divergences_match_trl(divergence):
    """f-DPO on every loss TRL allows it for, α = 0.5 (TRL's default). Then α = 0.3 here against TRL's α = 0.7:
    TRL 1.16 computes (u^(α-1) - 1)/(α - 1), the paper's (1 - u^-α)/α at 1 - α."""
    (pc, pr, rc, rr), lc, lr = _stats(2)
    alphas = [(0.5, 0.5), (0.3, 0.7)] if divergence == "alpha_divergence" else [(0.5, 0.5)]
    for name in F_SHARED:
        for a_ours, a_trl in alphas:
            eps = EPS.get(name, 0.0)
            want, want_grad = trl_dpo(pc, pr, rc, rr, lc, lr, loss_type=name, beta=0.3, eps=eps,
                                      divergence=divergence, alpha=a_trl)
            got, grad = ours(pc, pr, rc, rr, lc, lr, LossConfig(
                loss_types=(name,), beta=0.3, label_smoothing=eps, f_divergence_type=divergence,
                f_alpha_divergence_coef=a_ours))
            assert got == pytest.approx(want, rel=1e-5, abs=1e-6), (name, a_ours)
            torch.testing.assert_close(grad, want_grad, rtol=1e-4, atol=1e-6, msg=f"{name} {a_ours}")


@pytest.mark.parametrize("seed", [0, 1])
def test_orpo_and_cpo_preference_terms_match_trl(seed):
    """ORPO's λ·L_OR (TRL: `odds_ratio_loss` on length-averaged log-probs, minus its mean in the loss) and CPO's
    contrast (TRL: `cpo_loss`, sigmoid, ε = 0.1), per pair, values and gradients, λ = β = 0.2. Their NLL terms
    differ by convention (README, BENCHMARKS.md) and are checked against the papers in test_losses_numpy.py."""
    (pc, pr, _, _), lc, lr = _stats(seed)
    lct, lrt = torch.tensor(lc, dtype=torch.float32), torch.tensor(lr, dtype=torch.float32)
    orpo_self = SimpleNamespace(beta=0.2, accelerator=_OneProcess())
    x, y = pc.clone().requires_grad_(), pr.clone().requires_grad_()
    trl_terms = -orpo_trainer.ORPOTrainer.odds_ratio_loss(orpo_self, x / lct, y / lrt)[0]
    ours_terms = 0.2 * odds_ratio_loss(pc.clone().requires_grad_(), pr.clone().requires_grad_(), lct, lrt)
    torch.testing.assert_close(ours_terms, trl_terms, rtol=1e-5, atol=1e-6)
    want = torch.autograd.grad(trl_terms.sum(), (x, y))
    x2, y2 = pc.clone().requires_grad_(), pr.clone().requires_grad_()
    got = torch.autograd.grad(0.2 * odds_ratio_loss(x2, y2, lct, lrt).sum(), (x2, y2))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)

    cpo_self = SimpleNamespace(alpha=0.0, loss_type="sigmoid", beta=0.2, label_smoothing=0.1, simpo_gamma=0.5,
                               accelerator=_OneProcess())
    x, y = pc.clone().requires_grad_(), pr.clone().requires_grad_()
    trl_contrast = cpo_trainer.CPOTrainer.cpo_loss(cpo_self, x, y)[0]
    x2, y2 = pc.clone().requires_grad_(), pr.clone().requires_grad_()
    contrast = cpo_loss(x2, y2, lct, beta=0.2, nll_weight=0.0, label_smoothing=0.1)
    torch.testing.assert_close(contrast, trl_contrast, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.autograd.grad(contrast.sum(), (x2, y2)),
                               torch.autograd.grad(trl_contrast.sum(), (x, y)), rtol=1e-4, atol=1e-6)
    # With α: the whole per-pair loss is the contrast plus α·(-pc/|c|), the sft term every NLL here shares.
    torch.testing.assert_close(cpo_loss(pc, pr, lct, beta=0.2, nll_weight=0.7, label_smoothing=0.1),
                               trl_contrast.detach() + 0.7 * sft_loss(pc, lct), rtol=1e-5, atol=1e-6)
