"""LD-DPO (`ld_alpha`) and WPO (`use_weighting`) through `preference_loss`, against float64 numpy from the papers
(tests/independent.py: LD-DPO's split of each answer's token log-probs at the pair's shorter length, WPO's weight
from the next-token distributions themselves), values and gradients vs central differences, several seeds; and
the settings that cannot go together (one sentence each).

Inputs are drawn per token: each answer gets random next-token distributions over 9 tokens and a drawn token per
step, so the statistics handed to the loss (sums, first-ℓ sums, aligned sums) are computed here from the same
draws the oracle reads.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from independent import numeric_grad, numpy_ld_logps, numpy_losses, numpy_wpo_weight

from preftune.errors import PreftuneError
from preftune.losses import LOSSES, LossConfig, preference_loss

LD_LOSSES = [n for n, spec in LOSSES.items() if not spec.nll and not spec.unpaired]
WPO_LOSSES = [n for n, spec in LOSSES.items() if not spec.sorts_batch and not spec.unpaired]
OPTIONS = dict(beta=0.3, gamma=0.4, lam=3.0, shift=0.7, tau=0.3, cpo_alpha=0.6)


def _answer(rng, n: int):
    """(per-token log p of the drawn tokens, probability rows [n, 9], the tokens)."""
    logits = rng.normal(0.0, 2.0, (n, 9))
    rows = np.exp(logits - logits.max(1, keepdims=True))
    rows /= rows.sum(1, keepdims=True)
    ids = rng.integers(0, 9, n)
    return np.log(rows[np.arange(n), ids]), rows, ids


def _draw(seed: int, b: int = 5):
    """Per pair: policy and reference answers' per-token log-probs (the reference's perturbed from the policy's),
    their lengths (1..12), and the policy's distributions for WPO."""
    rng = np.random.default_rng(seed)
    out = {k: [] for k in ("pc", "pr", "rc", "rr", "rows_c", "ids_c", "rows_r", "ids_r")}
    lengths = rng.integers(1, 13, (2, b))
    for i in range(b):
        for side, n in (("c", lengths[0, i]), ("r", lengths[1, i])):
            tok, rows, ids = _answer(rng, n)
            out["p" + side].append(tok)
            out["r" + side].append(tok + rng.normal(0.0, 0.3, n))
            out["rows_" + side].append(rows)
            out["ids_" + side].append(ids)
    return out, lengths[0].astype(float), lengths[1].astype(float)


def _t(x):
    return torch.tensor(np.asarray(x, dtype=float), dtype=torch.float64)


def _statistics(d, lc, lr):
    """What the forward hands the loss: sums, sums of the first ℓ = min(|c|, |r|) tokens, aligned sums."""
    shared = np.minimum(lc, lr).astype(int)
    sums = {k: np.array([t.sum() for t in d[k]]) for k in ("pc", "pr", "rc", "rr")}
    firsts = {k: np.array([t[:n].sum() for t, n in zip(d[k], shared)]) for k in ("pc", "pr", "rc", "rr")}
    aligned = {s: np.array([(tok - np.log((rows ** 2).sum(1))).sum() for tok, rows in zip(d["p" + s], d["rows_" + s])])
               for s in ("c", "r")}
    return sums, firsts, aligned


def _call(cfg, sums, firsts, aligned, lc, lr, grad=False):
    args = {k: _t(v).requires_grad_(grad) for k, v in sums.items()}
    shared = {k: _t(v).requires_grad_(grad) for k, v in firsts.items()}
    out = preference_loss(args["pc"], args["pr"], args["rc"], args["rr"], _t(lc), _t(lr), cfg, reward_shift=0.7,
                          policy_chosen_shared_logps=shared["pc"], policy_rejected_shared_logps=shared["pr"],
                          reference_chosen_shared_logps=shared["rc"], reference_rejected_shared_logps=shared["rr"],
                          chosen_aligned_logps=_t(aligned["c"]), rejected_aligned_logps=_t(aligned["r"]))
    return out, args, shared


def _config(name, **extra):
    eps = 0.2 if LOSSES[name].label_smoothing else 0.0
    o = OPTIONS
    return LossConfig(loss_types=(name,), beta=o["beta"], label_smoothing=eps, simpo_gamma=o["gamma"],
                      dpop_lambda=o["lam"], discopop_tau=o["tau"], cpo_alpha=o["cpo_alpha"], **extra), eps


def _oracle(name, d, lc, lr, *, eps, alpha=None, weighted=False, sft_weight=0.0):
    shared = np.minimum(lc, lr).astype(int)
    if alpha is None:
        v = {k: np.array([t.sum() for t in d[k]]) for k in ("pc", "pr", "rc", "rr")}
    else:
        v = {k: np.array([numpy_ld_logps(t, n, alpha) for t, n in zip(d[k], shared)]) for k in ("pc", "pr", "rc", "rr")}
    loss = numpy_losses(name, v["pc"], v["pr"], v["rc"], v["rr"], lc, lr, eps=eps, **OPTIONS)
    loss = loss + sft_weight * -np.array([t.sum() for t in d["pc"]]) / lc  # the sft term reads the whole answer
    if weighted:
        loss = loss * np.array([numpy_wpo_weight(rc, ic, rr, ir) for rc, ic, rr, ir in
                                zip(d["rows_c"], d["ids_c"], d["rows_r"], d["ids_r"])])
    return loss


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ld_and_wpo_equal_numpy(seed):
    """Every loss each applies to: LD-DPO at α = 0.35, WPO, and both with an sft term (0.3, on the whole chosen
    answer, weighted like the rest), per pair to 1e-10."""
    d, lc, lr = _draw(seed)
    sums, firsts, aligned = _statistics(d, lc, lr)
    for name in sorted(set(LD_LOSSES) | set(WPO_LOSSES)):
        for alpha, weighted, sft in ((0.35, False, 0.0), (None, True, 0.0), (0.35, True, 0.3)):
            if (alpha is not None and name not in LD_LOSSES) or (weighted and name not in WPO_LOSSES):
                continue
            cfg, eps = _config(name, ld_alpha=alpha, use_weighting=weighted, sft_weight=sft)
            got = _call(cfg, sums, firsts, aligned, lc, lr)[0].losses.numpy()
            want = _oracle(name, d, lc, lr, eps=eps, alpha=alpha, weighted=weighted, sft_weight=sft)
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10, err_msg=f"{name} {alpha} {weighted} {seed}")


def _check_gradients(name: str, seed: int) -> None:
    d, lc, lr = _draw(seed)
    sums, firsts, aligned = _statistics(d, lc, lr)
    cfg, eps = _config(name, ld_alpha=0.35, use_weighting=True, sft_weight=0.2)
    out, args, shared = _call(cfg, sums, firsts, aligned, lc, lr, grad=True)
    out.losses.sum().backward()
    w = np.exp(aligned["c"] / lc + aligned["r"] / lr)

    def f(key, x):
        s, fs = {**sums}, {**firsts}
        (fs if key.startswith("first") else s)[key.removeprefix("first_")] = x
        ld = {k: fs[k] + 0.35 * (s[k] - fs[k]) for k in s}
        loss = numpy_losses(name, ld["pc"], ld["pr"], ld["rc"], ld["rr"], lc, lr, eps=eps, **OPTIONS)
        return (w * (loss - 0.2 * s["pc"] / lc)).sum()

    for key, tensor, base in (("pc", args["pc"], sums["pc"]), ("pr", args["pr"], sums["pr"]),
                              ("first_pc", shared["pc"], firsts["pc"]), ("first_pr", shared["pr"], firsts["pr"])):
        np.testing.assert_allclose(tensor.grad.numpy(), numeric_grad(lambda x, k=key: f(k, x), base), atol=1e-6,
                                   rtol=1e-6, err_msg=f"{name} {key} seed={seed}")


@pytest.mark.parametrize("name", ["sigmoid", "ipo", "simpo", "apo_zero", "hinge"])
def test_gradients_equal_central_differences(name):
    """d(Σ loss)/d(each policy sum and first-ℓ sum) under LD-DPO α = 0.35 and WPO (its weight a constant: no
    gradient flows through it, as in TRL) with an sft term 0.2, vs central differences of the numpy formula of
    those sums, two seeds."""
    for seed in (3, 4):
        _check_gradients(name, seed)


def test_identities():
    """α = 1 is plain DPO (bit for bit up to rounding); a policy certain of every token weighs 1 under WPO
    (aligned sums 0), so the weighted loss is the plain one; the weight carries no gradient."""
    d, lc, lr = _draw(9)
    sums, firsts, aligned = _statistics(d, lc, lr)
    plain = _call(LossConfig(beta=0.3), sums, firsts, aligned, lc, lr)[0].losses
    torch.testing.assert_close(_call(LossConfig(beta=0.3, ld_alpha=1.0), sums, firsts, aligned, lc, lr)[0].losses,
                               plain)
    zero = {"c": np.zeros(5), "r": np.zeros(5)}
    torch.testing.assert_close(_call(LossConfig(beta=0.3, use_weighting=True), sums, firsts, zero, lc, lr)[0].losses,
                               plain)
    with pytest.raises(ValueError, match="use_weighting needs chosen_aligned_logps, rejected_aligned_logps"):
        preference_loss(*(_t(sums[k]) for k in ("pc", "pr", "rc", "rr")), _t(lc), _t(lr),
                        LossConfig(use_weighting=True))


@pytest.mark.parametrize(("kw", "needle"), [
    (dict(loss_types=("aot",), use_weighting=True), "use_weighting (WPO) weighs each pair, but aot sorts the batch"),
    (dict(loss_types=("sigmoid", "orpo"), ld_alpha=0.5), "ld_alpha (LD-DPO) shortens the log-probs a preference "
                                                         "loss reads, but orpo also trains its NLL"),
    (dict(ld_alpha=1.5), "ld_alpha must be in [0, 1] (got 1.5)"),
    (dict(ref_model_mixup_alpha=0.0), "ref_model_mixup_alpha must be in (0, 1] (got 0.0)"),
])
def test_settings_that_cannot_go_together(kw, needle):
    with pytest.raises(PreftuneError) as e:
        LossConfig(**kw)
    assert str(e.value).startswith(needle), str(e.value)


@pytest.mark.parametrize(("kw", "needle"), [
    (dict(reference="precomputed"), "TR-DPO (sync_ref_model) moves the reference during training, so its log-probs "
                                    "cannot be precomputed; use reference copy."),
    (dict(reference="auto", lora=True), "TR-DPO (sync_ref_model) needs a reference model of its own to move"),
    (dict(reference="lora_disabled"), "TR-DPO (sync_ref_model) needs a reference model of its own to move"),
])
def test_tr_dpo_reference_refusals(kw, needle):
    cfg = LossConfig(sync_ref_model=True)
    with pytest.raises(PreftuneError, match=f"^{needle.replace('(', '[(]').replace(')', '[)]')}"):
        cfg.check_reference(kw["reference"], None, lora=kw.get("lora", False))
    cfg.check_reference("copy")  # and auto, which then picks copy
    cfg.check_reference("auto")
    with pytest.raises(PreftuneError, match="^sync_ref_model [(]TR-DPO[)] moves the reference, but loss simpo"):
        LossConfig(loss_types=("simpo",), sync_ref_model=True).check_reference("auto")
