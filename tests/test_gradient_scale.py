"""The gradient of one optimizer step, scale included, against a plain autograd computation (issue 16).

AdamW divides the gradient by its own running RMS, so a wrong overall scale (summing over pairs instead of
averaging, or dividing each micro-batch by its own size) leaves the weights of an AdamW run nearly the same;
comparing two runs of the same code (accumulation vs one batch) cannot see it either. Here the gradient the
recipe accumulates is read off the parameters during backward and compared with a gradient worked out by
hand on the initial model, and the logged grad_norm with that gradient's norm.
"""

from __future__ import annotations

import pytest
import torch
from helpers import make_pairs, write_jsonl
from independent import hand_ids, row_logp

from preftune import TrainConfig, sft, train
from preftune.callbacks import Callback
from preftune.outputs.metrics import read_metrics

BETA = 0.1
# fp32 gradients of the same sums, batched and padded differently (prefix-shared KV cache vs one unpadded row):
# measured relative differences 0.9-1.3e-7; 1e-4 is far above that and far below the error of a wrong
# normaliser (planted: no normalisation gives a relative error of 7 or 39, each micro-batch by its own size 2-3).
REL_TOL = 1e-4


class GradCapture(Callback):
    """Keeps each trainable parameter's .grad as left by the last backward of the first optimizer step (the
    accumulated gradient, before clipping and the update)."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}
        self.handles: list = []

    def on_train_begin(self, state) -> None:
        for name, p in state.model.named_parameters():
            if p.requires_grad:
                self.handles.append(p.register_post_accumulate_grad_hook(
                    lambda p, name=name: self.grads.__setitem__(name, p.grad.detach().clone())))

    def on_step_end(self, state) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def _cfg(model, data, out, **kw) -> TrainConfig:
    base = dict(model=str(model), data=str(data), output_dir=str(out), max_steps=1, learning_rate=1e-3,
                warmup_ratio=0.0, lr_scheduler="constant", progress=False, seed=3, max_length=64,
                max_prompt_length=32, beta=BETA, max_grad_norm=0.0)
    base.update(kw)
    return TrainConfig(**base)


def _rel_err(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    assert set(got) == set(want)
    diff = sum(float((got[n] - want[n]).double().pow(2).sum()) for n in want) ** 0.5
    norm = sum(float(want[n].double().pow(2).sum()) for n in want) ** 0.5
    return diff / norm


def _norm(grads: dict[str, torch.Tensor]) -> float:
    return sum(float(g.double().pow(2).sum()) for g in grads.values()) ** 0.5


@pytest.fixture(scope="module")
def eight_pairs(tmp_path_factory):
    rows = make_pairs(8, seed=21)
    return rows, write_jsonl(tmp_path_factory.mktemp("eight") / "pairs.jsonl", rows)


@pytest.mark.parametrize("batch_size, accumulation", [(8, 1), (2, 4), (3, 3)], ids=["8", "4x2", "3+3+2"])
def test_dpo_step_gradient_is_the_mean_over_pairs(tiny_model_dir, eight_pairs, tmp_path, batch_size, accumulation):
    """At step 1 policy == reference, so every margin h_i is 0 and the sigmoid loss ℓ_i = -log σ(β·h_i) has
    dℓ_i/dh_i = -β·σ(0) = -β/2. The step's loss is the mean over the N = 8 pairs of the global batch, so its
    gradient is G = -(β/2)/N · Σ_i ∇(log π(c_i|p_i) − log π(r_i|p_i)), computed here by autograd on unpadded
    rows of the initial model. Accumulating 4×2 or 3+3+2 micro-batches must give the same G (not 4× or
    8× it), and the logged grad_norm (before clipping) is ‖G‖."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows, data = eight_pairs
    cap = GradCapture()
    res = train(_cfg(tiny_model_dir, data, tmp_path / "run", batch_size=batch_size,
                     gradient_accumulation_steps=accumulation), callbacks=[cap])

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    surrogate = 0.0
    for r in rows:
        p, c = hand_ids(tok, r["prompt"], r["chosen"])
        _, rj = hand_ids(tok, r["prompt"], r["rejected"])
        surrogate = surrogate + (-BETA / 2) * (row_logp(model, p, c) - row_logp(model, p, rj)) / len(rows)
    surrogate.backward()
    want = {n: p.grad for n, p in model.named_parameters()}

    assert _rel_err(cap.grads, want) < REL_TOL
    first = read_metrics(res.output_dir)[0]
    assert first["grad_norm"] == pytest.approx(_norm(want), rel=REL_TOL)

    # AdamW's first step from zero moments: m̂ = G, v̂ = G², so W1 = W0 - lr·G/(|G| + ε) (weight decay 0),
    # whatever G's scale; lr = 1e-3 (constant, no warmup), ε = 1e-8. Where |G| > 1e-6 the update is ~lr·sign(G)
    # and rounding in G (~1e-10 absolute) moves it by < 1e-9; where G = 0 exactly (rows of tokens that never
    # occur) W does not move. The few left (|G| near ε, where G's last bits decide the update) are only checked
    # to move by at most lr.
    from safetensors.torch import load_file

    w0 = load_file(str(tiny_model_dir / "model.safetensors"))
    w1 = load_file(str(res.final_dir / "model.safetensors"))
    checked = total = 0
    for name, g in want.items():
        g, step = g.double(), w1[name].double() - w0[name].double()
        sure = (g.abs() > 1e-6) | (g == 0)
        expected = -1e-3 * g / (g.abs() + 1e-8)
        torch.testing.assert_close(step[sure], expected[sure], atol=1e-7, rtol=0,
                                   msg=lambda m, name=name: f"{name} {m}")
        assert step.abs().max() <= 1e-3 * (1 + 1e-4), name
        checked, total = checked + int(sure.sum()), total + g.numel()
    assert checked > 0.99 * total  # measured 99.6%


def test_sft_step_gradient_is_the_token_mean(tiny_model_dir, eight_pairs, tmp_path):
    """SFT on the chosen answers, 3+3+2 micro-batches: the loss is the NLL summed over all answer tokens of
    the global batch divided by their count T, so G = -(1/T) · Σ_i ∇ log π(c_i|p_i) (each token weighs the
    same, whatever micro-batch it falls in)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows, data = eight_pairs
    cap = GradCapture()
    res = sft(_cfg(tiny_model_dir, data, tmp_path / "run", batch_size=3, gradient_accumulation_steps=3),
              callbacks=[cap])

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = [hand_ids(tok, r["prompt"], r["chosen"]) for r in rows]
    tokens = sum(len(c) for _, c in ids)
    nll = -sum(row_logp(model, p, c) for p, c in ids) / tokens
    nll.backward()
    want = {n: p.grad for n, p in model.named_parameters()}

    assert _rel_err(cap.grads, want) < REL_TOL
    first = read_metrics(res.output_dir)[0]
    assert first["grad_norm"] == pytest.approx(_norm(want), rel=REL_TOL)
    assert first["loss"] == pytest.approx(float(nll.detach()), rel=1e-5)
