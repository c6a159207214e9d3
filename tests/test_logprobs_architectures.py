"""Every command that scores gives a plain one-sequence forward's log-probs on models the packed layout cannot
serve: ALiBi models (MPT, whose bias counts key columns, so a rejected token packed after the chosen answer sits
too far from its prompt: 2e-2 off; Bloom and Falcon with alibi=True, which unpack the mask as 2D and crash on the
packed 4D one) and a sliding window (4 tokens) shorter than the sequences. The forward plan's probe sends them to
the KV-cache path, the same in training, the reference precompute, the evaluation during training, `preftune
eval`, `preftune inspect --model` and `score_records`.

Per model (every dropout rate at 0.5, so the same run also checks that dropout is off): one `preftune train` step
with eval data (lr 0 at step 1: warmup), then eval, inspect and score on the same 8 pairs. Expected values: each
answer alone in one unpadded row through the model's own forward and full logits (tests/architectures.py), token
ids from the tokenizer alone (tests/independent.py). Tolerance 1e-4 per sequence log-prob (measured gaps ≤ 4e-6;
the packed MPT forward is 2e-2 off); inspect rounds its margins to 4 decimals, hence 2e-4 there.
"""

from __future__ import annotations

import math

import pytest
import torch
from architectures import NOT_PACKABLE, build, one_row_logp
from helpers import make_pairs, write_jsonl
from independent import hand_ids
from safetensors.torch import load_file

from preftune.cli import main
from preftune.outputs.metrics import read_metrics

ATOL = 1e-4


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def records():
    return make_pairs(8, seed=8)


@pytest.fixture(scope="module", params=sorted(NOT_PACKABLE))
def case(request, tok, records, tmp_path_factory):
    """(name, model folder, data file, expected per-pair log-probs {"chosen": [8], "rejected": [8]})."""
    name = request.param
    folder = tmp_path_factory.mktemp(name)
    specials = dict(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = build(name, len(tok), specials, spec=NOT_PACKABLE[name], to_save=True)
    model.save_pretrained(folder / "model")
    tok.save_pretrained(folder / "model")
    model.eval()
    with torch.no_grad():
        want = {side: torch.stack([one_row_logp(model, *hand_ids(tok, r["prompt"], r[side])) for r in records])
                for side in ("chosen", "rejected")}
    return name, folder / "model", write_jsonl(folder / "pairs.jsonl", records), want


def test_train_reference_and_evaluation_equal_one_row_forwards(case, tmp_path, capsys):
    """Step 1 (policy, training mode) logs the mean summed log-probs of the 8 pairs, the reference cache holds
    each pair's, and the evaluation at the end (the same 8 pairs, weights unchanged at lr 0) their means again;
    loss ln 2 and rewards 0 since the policy is the reference with dropout off."""
    name, model_dir, data, want = case
    out = tmp_path / "run"
    assert main(["train", "--model", str(model_dir), "--data", str(data), "--eval-data", str(data), "--output-dir",
                 str(out), "--max-steps", "1", "--batch-size", "8", "--max-length", "64", "--max-prompt-length", "32",
                 "--progress", "false"]) == 0
    printed = capsys.readouterr()
    assert "speed: KV-cache prefix sharing" in printed.out
    train_row, eval_row = read_metrics(out)
    cache = load_file(str(next((out / "reference_logps").glob("train-*.safetensors"))))
    for side in ("chosen", "rejected"):
        torch.testing.assert_close(cache[side].double(), want[side], atol=ATOL, rtol=0)
        for row in (train_row, eval_row):
            assert row[f"logps/{side}"] == pytest.approx(float(want[side].mean()), abs=ATOL), (row["split"], side)
    assert train_row["loss"] == pytest.approx(math.log(2), abs=1e-5) and train_row["rewards/chosen"] == 0.0
    assert train_row["lr"] == 0.0  # so final/ holds the starting weights


def test_eval_inspect_and_score_equal_one_row_forwards(case, tok, records):
    """`preftune eval` (M = R: the same folder), `preftune inspect --model` (margins chosen − rejected) and
    score_records, each on the 8 pairs; eval also scores 2 samples of the model (its KL part) without failing."""
    from preftune.audit import audit
    from preftune.evaluate import run_eval
    from preftune.modeling.load import load_model
    from preftune.scoring import score_records

    name, model_dir, data, want = case
    result = run_eval(str(model_dir), str(data), reference=str(model_dir), generate=0, kl_samples=2,
                      max_new_tokens=3, max_length=64, max_prompt_length=32)
    for side in ("chosen", "rejected"):
        for who in ("model", "reference"):
            assert result["preference"]["logps"][who][side] == pytest.approx(float(want[side].mean()), abs=ATOL)
    assert result["kl"]["per_token"] == 0.0  # the same model and plan on both sides
    model = load_model(str(model_dir), say=None)
    report = audit(str(data), tokenizer=tok, model=model, max_length=64, max_prompt_length=32)
    assert report["model"]["margin"]["mean"] == pytest.approx(float((want["chosen"] - want["rejected"]).mean()),
                                                              abs=2e-4)
    model.train()  # scoring runs in eval mode whatever the caller left on, and gives the mode back
    got = score_records(model, tok, records, max_length=64, max_prompt_length=32, batch_size=3)
    assert model.training and got["kept"] == list(range(8))
    for side in ("chosen", "rejected"):
        torch.testing.assert_close(got[f"{side}_logps"].double(), want[side], atol=ATOL, rtol=0)
