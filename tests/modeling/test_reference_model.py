"""A separate reference model (`reference_model`), and the evaluation split under every live strategy."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import build_tiny_model, make_pairs, write_jsonl
from independent import hand_ids, row_logp

from preftune import TrainConfig, train
from preftune.outputs.metrics import read_metrics

BETA = 0.1


@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    """Same architecture and tokenizer as the policy, other random weights (seed 1)."""
    return build_tiny_model(tmp_path_factory.mktemp("other_model"), seed=1)


@pytest.mark.parametrize("strategy", ["precomputed", "copy"])
def test_step_one_rewards_against_a_separate_reference(tiny_model_dir, other_model, tmp_path, strategy):
    """At step 1 the policy is the initial model and the reference is another model: the logged mean rewards are
    β·mean(log π(a|p) − log π_ref(a|p)) over the 8 pairs, each side computed here by plain forwards of both
    models. Batched vs unpadded fp32 log-probs differ by up to ~4e-6 (tests/test_scoring.py), so rewards by
    ~4e-7; tolerance 1e-5. The two models' rewards differ by ~0.018 (measured), far above it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = make_pairs(8, seed=61)
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    kw = dict(model=str(tiny_model_dir), data=str(data), output_dir=str(tmp_path / "run"), max_steps=1,
              batch_size=8, beta=BETA, progress=False, max_length=64, max_prompt_length=32)
    # First a run whose reference is the policy itself, in the same folder: its cached log-probs must not be
    # taken for the other model's (the cache key names the reference model).
    train(TrainConfig(**kw))
    res = train(TrainConfig(reference_model=str(other_model), reference=strategy, eval_data=str(data),
                            overwrite=True, **kw))
    caches = list((tmp_path / "run" / "reference_logps").glob("*.safetensors"))
    assert len(caches) == (1 if strategy == "copy" else 3)  # copy keeps a live model and writes no cache
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ref = AutoModelForCausalLM.from_pretrained(other_model)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    want = {"chosen": 0.0, "rejected": 0.0}
    with torch.no_grad():
        for r in rows:
            for side in want:
                p, a = hand_ids(tok, r["prompt"], r[side])
                want[side] += BETA * float(row_logp(policy, p, a) - row_logp(ref, p, a)) / len(rows)
    first = read_metrics(res.output_dir)[0]
    assert abs(want["chosen"]) > 0.005  # the two models do differ: the policy as its own reference cannot pass
    for side in want:
        assert first[f"rewards/{side}"] == pytest.approx(want[side], abs=1e-5), side
    assert math.isfinite(res.eval_metrics["loss"]) and "kl" in res.eval_metrics


def test_lora_disabled_reference_also_serves_evaluation(tiny_model_dir, pairs_file, eval_pairs_file, tmp_path):
    """With lora_disabled the base weights are the reference for the eval split too: after one step the eval
    rewards are small but the adapters moved them (B ≠ 0), and the KL estimate is there."""
    res = train(TrainConfig(model=str(tiny_model_dir), data=str(pairs_file), eval_data=str(eval_pairs_file),
                            output_dir=str(tmp_path / "run"), max_steps=2, batch_size=4, learning_rate=1e-2,
                            lora=True, lora_r=4, reference="lora_disabled", progress=False, max_length=64,
                            max_prompt_length=32))
    ev = res.eval_metrics
    assert ev["split"] == "eval" and "kl" in ev and math.isfinite(ev["loss"])
    assert ev["rewards/margins"] != 0.0


def test_reference_free_loss_evaluates_without_a_reference(tiny_model_dir, pairs_file, eval_pairs_file, tmp_path):
    """SimPO needs no reference: no cache is written, and evaluation runs without one (no KL estimate)."""
    res = train(TrainConfig(model=str(tiny_model_dir), data=str(pairs_file), eval_data=str(eval_pairs_file),
                            output_dir=str(tmp_path / "run"), max_steps=1, batch_size=4, loss="simpo",
                            progress=False, max_length=64, max_prompt_length=32))
    assert math.isfinite(res.eval_metrics["loss"]) and "kl" not in res.eval_metrics
    assert not (res.output_dir / "reference_logps").exists()
