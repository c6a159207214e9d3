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

from preftune.losses import (
    LossConfig,
    cpo_loss,
    kto_reference_point,
    odds_ratio_loss,
    preference_loss,
    sft_loss,
    unpaired_loss,
)

pytest.importorskip("trl", minversion="1.16", reason="trl >= 1.16 is not installed (pip install '.[bench]')")
dpo_trainer = pytest.importorskip("trl.trainer.dpo_trainer")
orpo_trainer = pytest.importorskip("trl.experimental.orpo.orpo_trainer")
cpo_trainer = pytest.importorskip("trl.experimental.cpo.cpo_trainer")
kto_trainer = pytest.importorskip("trl.trainer.kto_trainer")

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


def _trl_loss(per_token, mask, *, ref=None, ref_tokens=None, log_sum_sq=None, loss_type: str, beta: float,
              eps: float = 0.0, divergence: str = "reverse_kl", alpha: float = 0.5, tau: float = 0.05,
              ld_alpha: float | None = None):
    """TRL's `_compute_loss` on per-token policy log-probs [2n, width] (chosen rows, then rejected; `mask` [2n,
    width + 1] marks the answer tokens after one prompt token), with the reference precomputed (`ref`: its two
    summed vectors) or live (`ref_tokens`: per-token, run through a stand-in reference model), and WPO's
    per-token log Σ_v p(v)² when `log_sum_sq` is given."""
    outputs = SimpleNamespace(log_probs=per_token, entropy=torch.zeros_like(per_token),
                              mean_logits=torch.zeros_like(per_token), is_top1=torch.zeros_like(mask[:, 1:]).bool(),
                              log_sum_sq_probs=log_sum_sq)
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True, is_gradient_checkpointing=False, _modules={}), accelerator=_OneProcess(),
        aux_loss_enabled=False, precompute_ref_logps=ref is not None, ld_alpha=ld_alpha,
        use_weighting=log_sum_sq is not None, loss_types=[loss_type], loss_weights=[1.0], beta=beta,
        label_smoothing=eps, f_divergence_type=divergence, f_alpha_divergence_coef=alpha,
        ref_model=lambda **kw: SimpleNamespace(log_probs=ref_tokens),
        args=SimpleNamespace(discopop_tau=tau, gradient_checkpointing_kwargs=None),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros_like(mask), "attention_mask": torch.ones_like(mask), "completion_mask": mask}
    if ref is not None:
        inputs.update(ref_chosen_logps=ref[0], ref_rejected_logps=ref[1])
    return dpo_trainer.DPOTrainer._compute_loss(trainer, lambda **kw: outputs, inputs, False)


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
    loss = _trl_loss(per_token, mask, ref=(rc, rr), loss_type=loss_type, beta=beta, eps=eps, divergence=divergence,
                     alpha=alpha, tau=tau)
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


def _token_draw(seed: int, n: int = 6):
    """Per-token float32 policy log-probs of 2n answers (chosen rows, then rejected) of 1..12 tokens, the
    reference's (the policy's plus noise), and WPO's log Σ_v p(v)² per token (between log p and 0, as it is)."""
    rng = np.random.default_rng(seed)
    lengths = np.concatenate([rng.integers(1, 13, n), rng.integers(1, 13, n)])
    width = int(lengths.max())
    mask = torch.zeros(2 * n, width + 1, dtype=torch.long)
    pol, ref, lss = (torch.zeros(2 * n, width) for _ in range(3))
    for row, length in enumerate(lengths):
        mask[row, 1:1 + length] = 1
        tok = rng.uniform(-4.0, -0.05, length)
        pol[row, :length] = torch.tensor(tok)
        ref[row, :length] = torch.tensor(tok + rng.normal(0, 0.4, length))
        lss[row, :length] = torch.tensor(tok * rng.uniform(0.1, 0.9, length))
    return pol, ref, lss, mask, torch.tensor(lengths, dtype=torch.float32)


def _ours_from_tokens(pol, ref, lss, lengths, n, config: LossConfig):
    """preference_loss on the statistics the forward would hand it (sums, first-ℓ sums, aligned sums), with the
    gradient taken back to each policy token."""
    pol = pol.clone().requires_grad_()
    ell = torch.minimum(lengths[:n], lengths[n:]).repeat(2)
    first = (torch.arange(pol.shape[1])[None, :] < ell[:, None]).float()
    sums, shared, rsums, rshared = pol.sum(1), (pol * first).sum(1), ref.sum(1), (ref * first).sum(1)
    aligned = (pol.detach() - lss).sum(1)
    loss = preference_loss(sums[:n], sums[n:], rsums[:n], rsums[n:], lengths[:n], lengths[n:], config,
                           policy_chosen_shared_logps=shared[:n], policy_rejected_shared_logps=shared[n:],
                           reference_chosen_shared_logps=rshared[:n], reference_rejected_shared_logps=rshared[n:],
                           chosen_aligned_logps=aligned[:n], rejected_aligned_logps=aligned[n:]).losses.mean()
    (grad,) = torch.autograd.grad(loss, pol)
    return float(loss.detach()), grad


@pytest.mark.parametrize("seed", [0, 1])
def test_ld_alpha_and_wpo_match_trl(seed):
    """LD-DPO (ld_alpha 0.35, a live reference: TRL desensitises its per-token log-probs too) and WPO
    (use_weighting; TRL refuses aot*, and 1.16's hinge fails in backward with it), alone and together, on every
    loss type both have: batch-mean loss and the gradient of every policy token's log-prob, 1e-5 / 1e-4 (float32).
    Hinge with WPO is checked against the numpy oracle (test_losses_transforms.py) instead."""
    pol, ref, lss, mask, lengths = _token_draw(seed)
    n = len(lengths) // 2
    for name in SHARED:
        for ld, weighting in ((0.35, False), (None, True), (0.35, True)):
            if weighting and name in ("aot", "aot_unpaired", "hinge"):
                continue  # TRL refuses aot*; its hinge raises in backward (`*=` on relu's saved output)
            eps = EPS.get(name, 0.0)
            x = pol.clone().requires_grad_()
            want = _trl_loss(x, mask, ref_tokens=ref, log_sum_sq=lss if weighting else None, loss_type=name, beta=0.3,
                             eps=eps, tau=0.3, ld_alpha=ld)
            (want_grad,) = torch.autograd.grad(want, x)
            got, grad = _ours_from_tokens(pol, ref, lss, lengths, n, LossConfig(
                loss_types=(name,), beta=0.3, label_smoothing=eps, discopop_tau=0.3, ld_alpha=ld,
                use_weighting=weighting))
            assert got == pytest.approx(float(want.detach()), rel=1e-5, abs=1e-6), (name, ld, weighting)
            # Padding columns are no tokens (TRL's LD masks count some as "shared": their log-probs are 0 there).
            torch.testing.assert_close(grad * mask[:, 1:], want_grad * mask[:, 1:], rtol=1e-4, atol=1e-6,
                                       msg=f"{name} {ld} {weighting}")


def _kto_draw(seed: int, n: int = 6):
    """Per-token float32 log-probs of n answers (lengths 1..9) and of their n mismatched pairs (prompt i with
    answer i-1), for the policy and the reference, and labels with both kinds."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 10, n)
    kl_lengths = np.roll(lengths, 1)
    width = int(lengths.max())

    def tokens(lens):
        t = torch.zeros(n, width)
        for row, length in enumerate(lens):
            t[row, :length] = torch.tensor(rng.uniform(-4.0, -0.05, length))
        return t

    pol, kl_pol = tokens(lengths), tokens(kl_lengths)
    ref, kl_ref = pol + torch.tensor(rng.normal(0, 0.5, pol.shape)).float(), kl_pol - 0.4
    ref, kl_ref = ref * (pol != 0), kl_ref * (kl_pol != 0)
    labels = rng.random(n) < 0.5
    labels[:2] = [True, False]
    return pol, ref, kl_pol, kl_ref, torch.tensor(labels), lengths, kl_lengths


def trl_kto(pol, ref, kl_pol, kl_ref, labels, lengths, kl_lengths, *, loss_type: str, beta: float, w_d: float,
            w_u: float):
    """TRL's KTOTrainer._compute_loss on one micro-batch (one process, reference precomputed), its loss and the
    gradient of each policy token's log-prob."""
    n, width = pol.shape
    masks = []
    for lens in (lengths, kl_lengths):
        mask = torch.zeros(n, width + 1, dtype=torch.long)  # one prompt token, then the answer
        for row, length in enumerate(lens):
            mask[row, 1:1 + length] = 1
        masks.append(mask)
    pol = pol.clone().requires_grad_()
    batch = {"input_ids": torch.zeros_like(masks[0]), "attention_mask": torch.ones_like(masks[0]),
             "completion_mask": masks[0], "KL_input_ids": torch.ones_like(masks[1]),
             "KL_attention_mask": torch.ones_like(masks[1]), "KL_completion_mask": masks[1], "label": labels,
             "ref_logps": ref.sum(1), "ref_KL_logps": kl_ref.sum(1)}

    def model(input_ids, **kw):  # the KL sequences are the rows of ones
        out = kl_pol if bool(input_ids.all()) else pol
        return SimpleNamespace(log_probs=out, entropy=torch.zeros_like(out), mean_logits=torch.zeros_like(out))

    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=_OneProcess(), loss_type=loss_type, beta=beta,
        desirable_weight=w_d, undesirable_weight=w_u, calculate_KL=loss_type == "kto", precompute_ref_logps=True,
        aux_loss_enabled=False, _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1, args=SimpleNamespace(gradient_checkpointing_kwargs=None))
    trainer._compute_kl_logps = lambda m, b: kto_trainer.KTOTrainer._compute_kl_logps(trainer, m, b)
    loss = kto_trainer.KTOTrainer._compute_loss(trainer, model, batch, False)
    (grad,) = torch.autograd.grad(loss, pol)
    return float(loss.detach()), grad, trainer._metrics["train"]["kl"][-1]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kto_and_apo_zero_unpaired_match_trl(seed):
    """KTO and apo_zero_unpaired on one micro-batch of 6 examples (β 0.3, λ_D 1.4, λ_U 0.8): our reference point
    (the mismatched pairs' mean log-ratio, clamped at 0) is TRL's logged `kl`; the batch-mean loss and the gradient
    of every policy token's log-prob agree to 1e-5 / 1e-4 (float32). The noise drawn for the reference makes the
    estimate positive here (KL pairs' reference 0.4 nats lower per token), so the clamp is not what agrees."""
    pol, ref, kl_pol, kl_ref, labels, lengths, kl_lengths = _kto_draw(seed)
    for name in ("kto", "apo_zero_unpaired"):
        want, want_grad, trl_kl = trl_kto(pol, ref, kl_pol, kl_ref, labels, lengths, kl_lengths, loss_type=name,
                                          beta=0.3, w_d=1.4, w_u=0.8)
        z0 = kto_reference_point(float((kl_pol.sum(1) - kl_ref.sum(1)).double().sum()), len(labels))
        if name == "kto":
            assert float(z0) == pytest.approx(trl_kl, rel=1e-5) and float(z0) > 0
        x = pol.clone().requires_grad_()
        cfg = LossConfig(loss_types=(name,), beta=0.3, desirable_weight=1.4, undesirable_weight=0.8)
        losses, _ = unpaired_loss(x.sum(1), ref.sum(1), labels, cfg, z0)
        got = losses.mean()
        assert float(got.detach()) == pytest.approx(want, rel=1e-5, abs=1e-6), name
        torch.testing.assert_close(torch.autograd.grad(got, x)[0], want_grad, rtol=1e-4, atol=1e-6, msg=name)
