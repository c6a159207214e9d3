"""The training recipe end to end on a tiny Llama: first-step loss, accumulation, learning, LoRA, references, SFT."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from preftune import TrainConfig, sft, train
from preftune.outputs.metrics import read_metrics


def _cfg(model, data, out, **kw) -> TrainConfig:
    base = dict(model=str(model), data=str(data), output_dir=str(out), max_steps=2, batch_size=4,
                learning_rate=1e-3, warmup_ratio=0.0, lr_scheduler="constant", progress=False, seed=3,
                max_length=64, max_prompt_length=32)
    base.update(kw)
    return TrainConfig(**base)


def test_first_step_loss_is_ln2_with_zero_rewards(tiny_model_dir, pairs_file, tmp_path):
    """Policy == reference at step 1: every log-ratio is 0, so loss = -log σ(0) = ln 2 = 0.693147, rewards 0."""
    train(_cfg(tiny_model_dir, pairs_file, tmp_path / "run", max_steps=1))
    first = read_metrics(tmp_path / "run")[0]
    assert first["step"] == 1 and first["split"] == "train"
    # The precomputed reference comes from batches of another composition and padding: fp32 log-ratios are
    # ~1e-7, not exactly 0. 1e-5 is far above that and far below a wrong reference (stale log-probs gave
    # rewards of ~1 in test_reference_cache.py).
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "kl"):
        assert first[key] == pytest.approx(0.0, abs=1e-5)
    for key in ("grad_norm", "lr", "pairs_per_s", "tokens_per_s", "logps/chosen", "logps/rejected",
                "rewards/accuracies"):
        assert key in first


@pytest.mark.parametrize("loss", ["sigmoid", "bco_pair"])
def test_accumulation_4x2_equals_batch_8(tiny_model_dir, pairs_file, tmp_path, loss):
    """Three optimizer steps of 8 pairs, as 4 micro-batches of 2 or 1 batch of 8: same losses and weights (fp32).

    bco_pair: its reward shift δ must move once per optimizer step (the mean of all rewards of earlier steps),
    not after each micro-batch, or the micro-batches of step 2 would see different δ than the big batch (at
    step 1 all rewards are 0, so it takes a second step to show)."""
    kw = dict(max_steps=3, loss=loss)
    a = train(_cfg(tiny_model_dir, pairs_file, tmp_path / "a", batch_size=2, gradient_accumulation_steps=4, **kw))
    b = train(_cfg(tiny_model_dir, pairs_file, tmp_path / "b", batch_size=8, gradient_accumulation_steps=1, **kw))
    # Micro-batch sums and one batch's sum round differently in fp32 (~1e-7); 1e-5 is far above that. AdamW
    # hides the gradient's overall scale from this comparison: test_gradient_scale.py checks the scale.
    for ra, rb in zip(read_metrics(a.output_dir), read_metrics(b.output_dir), strict=True):
        assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-5)
    wa = load_file(str(a.final_dir / "model.safetensors"))
    wb = load_file(str(b.final_dir / "model.safetensors"))
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=1e-5, rtol=0)


def test_sixty_steps_raise_heldout_accuracy_above_0_9(tiny_model_dir, tmp_path):
    from helpers import make_pairs, write_jsonl

    data = write_jsonl(tmp_path / "train.jsonl", make_pairs(256, seed=11))
    held = write_jsonl(tmp_path / "held.jsonl", make_pairs(64, seed=12))
    res = train(_cfg(tiny_model_dir, data, tmp_path / "run", max_steps=60, batch_size=8, eval_data=str(held),
                     eval_steps=30, beta=0.1, logging_steps=10))
    evals = [r for r in read_metrics(res.output_dir) if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [30, 60]
    assert res.eval_metrics["rewards/accuracies"] > 0.9
    assert res.eval_metrics["rewards/margins"] > 0
    # final/ is a folder transformers loads directly
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(res.final_dir)
    AutoTokenizer.from_pretrained(res.final_dir)
    assert (res.output_dir / "config.yaml").is_file()


def test_lora_leaves_base_weights_unchanged(tiny_model_dir, pairs_file, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    res = train(_cfg(tiny_model_dir, pairs_file, tmp_path / "run", lora=True, lora_r=4, reference="lora_disabled",
                     max_steps=3))
    assert (res.final_dir / "adapter_config.json").is_file()
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), res.final_dir)
    base_after = {n.replace("base_model.model.", "").replace(".base_layer", ""): p
                  for n, p in tuned.named_parameters() if "lora_" not in n}
    for name, p in original.named_parameters():
        torch.testing.assert_close(base_after[name], p, atol=0, rtol=0)
    # ... while the adapters did learn something (lora_B starts at zero)
    assert any(p.abs().sum() > 0 for n, p in tuned.named_parameters() if "lora_B" in n)


def test_lora_merge_writes_a_plain_model(tiny_model_dir, pairs_file, tmp_path):
    res = train(_cfg(tiny_model_dir, pairs_file, tmp_path / "run", lora=True, lora_r=4, merge_lora=True, max_steps=1))
    assert (res.final_dir / "model.safetensors").is_file() and not (res.final_dir / "adapter_config.json").exists()


@pytest.mark.parametrize("live", ["copy", "lora_disabled"])
def test_precomputed_reference_matches_live_reference(tiny_model_dir, pairs_file, tmp_path, live):
    lora = live == "lora_disabled"
    pre = train(_cfg(tiny_model_dir, pairs_file, tmp_path / "pre", reference="precomputed", lora=lora, max_steps=3))
    liv = train(_cfg(tiny_model_dir, pairs_file, tmp_path / "live", reference=live, lora=lora, max_steps=3))
    mp, ml = read_metrics(pre.output_dir), read_metrics(liv.output_dir)
    assert len(mp) == len(ml) == 3
    for a, b in zip(mp, ml):
        # Precomputed and live reference log-probs come from batches of different composition and padding, so
        # fp32 sums round differently (seen: ~1e-7 on the tiny model); 1e-5 is far above that and far below
        # what a wrong reference would change (losses move by ~1e-3 per step here).
        for key in ("loss", "rewards/chosen", "rewards/rejected", "kl"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), key
    assert list((pre.output_dir / "reference_logps").glob("train-*.safetensors"))


def test_reference_cache_is_reused_on_rerun(tiny_model_dir, pairs_file, tmp_path):
    out = tmp_path / "run"
    train(_cfg(tiny_model_dir, pairs_file, out, max_steps=1))
    cache = next((out / "reference_logps").glob("train-*.safetensors"))
    stamp = cache.stat().st_mtime_ns
    train(_cfg(tiny_model_dir, pairs_file, out, max_steps=1, overwrite=True, reference="precomputed"))
    assert [p.name for p in (out / "reference_logps").glob("train-*.safetensors")] == [cache.name]
    assert cache.stat().st_mtime_ns == stamp  # read back, not recomputed
    # a different tokenization is a different key: a new file, the old one untouched
    train(_cfg(tiny_model_dir, pairs_file, out, max_steps=1, overwrite=True, max_prompt_length=8))
    assert len(list((out / "reference_logps").glob("train-*.safetensors"))) == 2


def test_sft_masks_the_prompt(tiny_model_dir, tmp_path):
    """The first logged SFT loss is the token-mean NLL of the completion tokens only (EOS included), which we
    recompute by hand with an unpadded forward of the initial model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = [{"prompt": "question: red cat answer:", "completion": " yes good dog"},
            {"prompt": "question: blue answer:", "completion": " no bad tree river"}]
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = sft(_cfg(tiny_model_dir, data, tmp_path / "run", max_steps=1, batch_size=2))
    first = read_metrics(res.output_dir)[0]

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    nll, count = 0.0, 0
    with torch.no_grad():
        for r in rows:
            p = tok(r["prompt"])["input_ids"]
            full = tok(r["prompt"] + r["completion"])["input_ids"] + [tok.eos_token_id]
            lp = torch.log_softmax(model(input_ids=torch.tensor([full])).logits[0, :-1], -1)
            tgt = torch.tensor(full[1:])
            tok_lp = lp.gather(-1, tgt[:, None]).squeeze(-1)[len(p) - 1:]
            nll -= float(tok_lp.sum())
            count += len(full) - len(p)
    # fp32 batched vs one unpadded row per example: ~1e-6 on a loss of ~6; 1e-4 still catches one prompt token
    # counted in (that would move the mean NLL by ~0.5).
    assert first["loss"] == pytest.approx(nll / count, abs=1e-4)


def test_sft_on_preference_file_uses_chosen(tiny_model_dir, pairs_file, tmp_path):
    res = sft(_cfg(tiny_model_dir, pairs_file, tmp_path / "run", max_steps=2))
    assert "preference-chosen" in res.data_summary
    assert read_metrics(res.output_dir)[-1]["step"] == 2


@pytest.mark.parametrize("kw", [{"gradient_checkpointing": True}, {"mixed_precision": "bf16"},
                                {"reference": "copy", "dtype": "bfloat16", "learning_rate": 1e-2}],
                         ids=["grad-checkpointing", "bf16-autocast", "bf16-weights"])
def test_precision_and_memory_options_start_at_ln2(tiny_model_dir, pairs_file, tmp_path, kw):
    """Whatever the precision or recomputation, policy == reference at step 1: loss ln 2 (bf16: within 1e-2)."""
    res = train(_cfg(tiny_model_dir, pairs_file, tmp_path / "run", max_steps=2, **kw))
    first, second = read_metrics(res.output_dir)[:2]
    # bf16 keeps ~3 significant digits, so log-ratios of summed bf16 log-probs are off by up to ~1e-2 nats·β;
    # fp32 with recomputation is exact up to fp32 rounding (see test_first_step_loss_is_ln2_with_zero_rewards).
    # That recomputation really happens is tested in tests/modeling/test_gradient_checkpointing.py.
    tol = 1e-5 if kw.get("gradient_checkpointing") else 1e-2
    assert first["loss"] == pytest.approx(math.log(2), abs=tol)
    assert math.isfinite(second["loss"]) and math.isfinite(second["grad_norm"])


@pytest.mark.parametrize("kind, expected", [
    ("cosine", [0.0, 0.5, 1.0, 0.853553, 0.5, 0.146447]),
    ("linear", [0.0, 0.5, 1.0, 0.75, 0.5, 0.25]),
    ("constant", [0.0, 0.5, 1.0, 1.0, 1.0, 1.0]),
])
def test_lr_schedule(kind, expected):
    """warmup 2, total 6, transformers' convention: warmup factors s/w = 0, 1/2 (learning rate 0 at step 0, the
    peak at the end of warmup); then progress p = (s-2)/4 = 0, 1/4, 1/2, 3/4; cosine 0.5(1+cos πp) = 1,
    0.853553, 0.5, 0.146447; linear 1-p = 1, 0.75, 0.5, 0.25."""
    from preftune.optim import lr_schedule

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = lr_schedule(opt, kind, warmup=2, total=6)
    got = []
    for _ in range(6):
        got.append(sched.get_last_lr()[0] / 2.0)
        opt.step()
        sched.step()
    assert got == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("kind, theirs", [("cosine", "cosine"), ("linear", "linear"),
                                          ("constant", "constant_with_warmup")])
@pytest.mark.parametrize("warmup, total", [(0, 5), (3, 10), (4, 4), (1, 7)])
def test_lr_schedule_equals_transformers(kind, theirs, warmup, total):
    """The same factors as transformers.get_scheduler, an independent implementation, at every step."""
    from transformers import get_scheduler

    from preftune.optim import lr_schedule

    def factors(make):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = make(opt)
        out = []
        for _ in range(total):
            out.append(sched.get_last_lr()[0])
            opt.step()
            sched.step()
        return out

    ours = factors(lambda o: lr_schedule(o, kind, warmup, total))
    ref = factors(lambda o: get_scheduler(theirs, o, num_warmup_steps=warmup, num_training_steps=total))
    assert ours == pytest.approx(ref, abs=1e-12)


def test_max_length_is_capped_at_the_models_positions(tiny_model_dir, tmp_path, capsys):
    """The tiny model has 256 positions: max_length 1024 / max_prompt_length 512 become 256 / 128, said once,
    and the data is cut at the capped lengths: one prompt of 100 "ok" (3 tokens each in the tiny vocabulary, so
    300+) is longer than 128 tokens but shorter than 512: it is truncated only if the cap reached the tokenizer."""
    import yaml
    from helpers import make_pairs, write_jsonl

    rows = make_pairs(8, seed=4)
    rows[0]["prompt"] = "question: " + " ".join(["ok"] * 100) + " answer:"
    data = write_jsonl(tmp_path / "long.jsonl", rows)
    res = train(_cfg(tiny_model_dir, data, tmp_path / "run", max_steps=1, max_length=1024, max_prompt_length=512))
    out = capsys.readouterr().out
    assert out.count("max_length 1024 is more than the model's 256 positions: capped it to 256 and "
                     "max_prompt_length 512 to 128") == 1
    saved = yaml.safe_load((res.output_dir / "config.yaml").read_text())
    assert (saved["max_length"], saved["max_prompt_length"]) == (256, 128)
    assert "1 prompts truncated (left)" in (res.output_dir / "data_summary.txt").read_text()
