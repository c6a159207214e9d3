"""Dropout off means off, on every architecture: nn.Dropout modules, the float rates attention/MLP code reads
(Llama's `self.attention_dropout`, Bloom's `self.hidden_dropout`, OPT's `self.layerdrop`, MPT's
`self.attn_dropout_p`, ...), config fields read at forward time (Falcon), and LoRA's dropout added after them;
`disable_dropout: false` keeps them all.

Each model is built tiny with every dropout rate at 0.5 (tests/architectures.py names them by hand) and put in
training mode. Two forwards of the same tokens are then equal to the last bit when dropout is off (the same
kernels on the same inputs), and differ by ~0.1-0.5 in some logit while any rate is left on (measured: a Llama
whose attention_dropout stayed 0.5 differs by 0.28).
"""

from __future__ import annotations

import math

import pytest
import torch
from architectures import ARCHITECTURES, build
from helpers import make_pairs, write_jsonl

from preftune.cli import main
from preftune.logprobs import ForwardPlan, LogpsModel
from preftune.outputs.metrics import read_metrics

IDS = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))


def _two_forwards_differ_by(model) -> float:
    model.train()
    with torch.no_grad():
        mask = torch.ones_like(IDS)
        return float((model(input_ids=IDS, attention_mask=mask).logits -
                      model(input_ids=IDS, attention_mask=mask).logits).abs().max())


@pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False")
@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_the_handle_turns_every_dropout_off(name):
    """13 architectures: with dropout kept (disable_dropout: false) two training-mode forwards differ; the
    handle of a plan without dropout makes them equal, and does so again after LoRA (lora_dropout 0.5) wraps
    the model, whose training mode stays on."""
    from peft import LoraConfig, get_peft_model

    kept = build(name)
    LogpsModel(kept, ForwardPlan(keep_dropout=True))
    assert _two_forwards_differ_by(kept) > 1e-3  # the rates are really on
    model = build(name)
    LogpsModel(model, ForwardPlan(keep_dropout=False))
    assert _two_forwards_differ_by(model) == 0.0 and model.training
    lora = get_peft_model(build(name), LoraConfig(r=2, lora_alpha=4, lora_dropout=0.5, target_modules="all-linear",
                                                  init_lora_weights=False))
    LogpsModel(lora, ForwardPlan(keep_dropout=False))
    assert _two_forwards_differ_by(lora) == 0.0


@pytest.fixture(scope="module")
def folders(tiny_model_dir, tmp_path_factory):
    """Llama and GPT-2 with every rate at 0.5 (and the tests' tokenizer), saved as model folders, and 8 pairs."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    specials = dict(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    root = tmp_path_factory.mktemp("dropout")
    out = {}
    for name in ("llama", "gpt2"):
        build(name, len(tok), specials, to_save=True).save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out[name] = root / name
    return out, write_jsonl(root / "pairs.jsonl", make_pairs(8, seed=4))


@pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False")
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_one_cli_step_with_dropout_rates_gives_ln2_and_zero_rewards(folders, tmp_path, name, lora):
    """`preftune train` for 1 step on a model whose rates are 0.5, also wrapped by LoRA: the policy is the
    reference (precomputed in eval mode), so with dropout really off every log-ratio is 0: loss = ln 2 = 0.693147,
    rewards 0 (fp32 noise ~1e-7). A rate left on moves the policy's log-probs by nats (rewards ~0.1·nats). (LoRA's
    B starts at 0, so its own dropout cannot show at step 1: the test above covers it with non-zero adapters.)
    warmup_ratio 0.1 of 1 step is ceil(0.1) = 1 warmup step, as transformers counts, so step 1 runs at lr 0."""
    paths, data = folders
    out = tmp_path / "run"
    args = ["train", "--model", str(paths[name]), "--data", str(data), "--output-dir", str(out), "--max-steps", "1",
            "--batch-size", "8", "--max-length", "64", "--max-prompt-length", "32", "--progress", "false"]
    assert main(args + (["--lora", "true", "--lora-dropout", "0.5", "--lora-target-modules", "all-linear"]
                        if lora else [])) == 0
    first = read_metrics(out)[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)
    for key in ("rewards/chosen", "rewards/rejected", "kl"):
        assert first[key] == pytest.approx(0.0, abs=1e-5), key
    assert first["lr"] == 0.0


def test_disable_dropout_false_keeps_the_rates_through_the_cli(folders, tmp_path):
    """`--disable-dropout false` reaches the forward plan: the same 1-step run as above on the Llama with rates 0.5,
    now with dropout kept, scores a policy that drops units against a precomputed reference (eval mode) that does
    not, so step 1's rewards leave 0 by far more than the fp32 noise of the run above (~1e-7): measured
    rewards/chosen -4.4e-3, rewards/rejected -3.4e-3 (β 0.1), loss 0.693689 against ln 2 = 0.693147. Before this
    test, a plan that always disabled dropout passed every test (planted by hand)."""
    paths, data = folders
    out = tmp_path / "run"
    assert main(["train", "--model", str(paths["llama"]), "--data", str(data), "--output-dir", str(out),
                 "--max-steps", "1", "--batch-size", "8", "--max-length", "64", "--max-prompt-length", "32",
                 "--progress", "false", "--disable-dropout", "false"]) == 0
    first = read_metrics(out)[0]
    assert min(abs(first["rewards/chosen"]), abs(first["rewards/rejected"])) > 1e-3, first
    assert abs(first["loss"] - math.log(2)) > 1e-4, first
