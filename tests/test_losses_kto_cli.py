"""KTO and apo_zero_unpaired from the command line, on unpaired data:

- step 1: policy = reference, so every log-ratio and the reference point are 0 and each example's loss is half
  its weight: with 6 desirable examples at λ_D = 1.5 and 2 undesirable at λ_U = 0.7 in one global batch,
  0.5·(6·1.5 + 2·0.7)/8 = 0.65;
- the reference point is one estimate per global batch: 4 examples × 1 micro-batch and 2 × 2 accumulated give
  the same losses and kl, a live reference copy the same as the precomputed one (its mismatched pairs included);
- the estimate equals a plain implementation: each prompt of the global batch with the previous example's answer,
  log-probs from one unpadded row per sequence (tests/independent.py);
- bad input: one sentence (or the invalid-rows listing), exit 2, nothing written; `inspect` counts the labels.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from helpers import make_pairs, write_jsonl
from independent import numpy_kto_reference_point, row_logp

from preftune.cli import main


def _examples(n_pairs: int, seed: int, desirable_only: bool = False) -> list[dict]:
    rows = []
    for p in make_pairs(n_pairs, seed=seed):
        rows.append({"prompt": p["prompt"], "completion": p["chosen"], "label": True})
        if not desirable_only:
            rows.append({"prompt": p["prompt"], "completion": p["rejected"], "label": False})
    return rows


def _cli(model, data, out, *extra):
    return main(["train", "--model", str(model), "--data", str(data), "--output-dir", str(out), "--max-length", "64",
                 "--max-prompt-length", "32", "--progress", "false", *extra])


def _train_rows(out):
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"]


def test_kto_step_1_is_half_the_weights(tmp_path, tiny_model_dir, capsys):
    rows = _examples(2, seed=3) + _examples(4, seed=4, desirable_only=True)  # 6 desirable, 2 undesirable
    out = tmp_path / "run"
    assert _cli(tiny_model_dir, write_jsonl(tmp_path / "d.jsonl", rows), out, "--loss", "kto", "--max-steps", "1",
                "--batch-size", "8", "--desirable-weight", "1.5", "--undesirable-weight", "0.7") == 0
    printed = capsys.readouterr().out
    assert "(6 desirable, 2 undesirable)" in printed
    # one answer a row, as SFT's examples (it said "prompt·chosen·rejected as one sequence" before)
    assert "speed: packed rows (prompt·completion as one sequence, one example per row" in printed
    assert "label balance: 6 desirable vs 2 undesirable examples give desirable_weight·n_D / (undesirable_weight·n_U)" \
           " = 6.43" in printed
    first = _train_rows(out)[0]
    assert first["loss"] == pytest.approx(0.65, abs=1e-6)
    assert first["kl"] == 0.0 and first["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)


def test_reference_point_is_one_per_global_batch(tmp_path, tiny_model_dir):
    """3 steps at lr 1e-2 (the policy moves, so kl reaches ~1.5 at step 3): 4 × 1, 2 × 2 and the live copy with
    the precomputed reference agree to 1e-5. The scale of fp32 rounding: the summed log-probs are ~-80 nats, one
    ulp there is 7.6e-6, and batches of other shapes (2 rows, not 4) round differently; with
    ATEN_CPU_CAPABILITY=default step 1's kl came out 1.9e-6 for 2 × 2 where 4 × 1 gave 0. An estimate per
    micro-batch would average other mismatched pairs; the next test checks which pairs against a plain sum."""
    data = write_jsonl(tmp_path / "d.jsonl", _examples(8, seed=5))
    flags = ["--loss", "kto", "--max-steps", "3", "--learning-rate", "1e-2", "--lr-scheduler", "constant",
             "--warmup-ratio", "0", "--beta", "0.5"]
    runs = {}
    for name, extra in (("4x1", ["--batch-size", "4"]),
                        ("2x2", ["--batch-size", "2", "--gradient-accumulation-steps", "2"]),
                        ("copy", ["--batch-size", "4", "--reference", "copy"])):
        assert _cli(tiny_model_dir, data, tmp_path / name, *flags, *extra) == 0
        runs[name] = [(r["loss"], r["kl"]) for r in _train_rows(tmp_path / name)]
    assert runs["4x1"][2][1] > 1e-4
    assert np.allclose(runs["2x2"], runs["4x1"], atol=1e-5, rtol=0)
    assert np.allclose(runs["copy"], runs["4x1"], atol=1e-5, rtol=0)


def test_reference_point_against_a_plain_implementation(tmp_path, tiny_model_dir):
    """A policy moved away from its reference (seeded noise on every weight). For step 1's global batch of 4
    (from the run's order, the same for 4 × 1 and 2 × 2), the sum of log π/π_ref over its mismatched pairs (each prompt
    with the previous example's answer, the first with the last's) equals the sum over unpadded rows, 1e-4."""
    from preftune.config import TrainConfig
    from preftune.data.batching import TrainOrder
    from preftune.data.splits import DataSettings, load_splits
    from preftune.device import forward_handle
    from preftune.modeling.load import load_model_and_tokenizer
    from preftune.modeling.mismatched import MismatchedPairs, score_answers
    from preftune.modeling.precomputed import Placement

    ref, tok = load_model_and_tokenizer(str(tiny_model_dir))
    policy = copy.deepcopy(ref)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    cfg = TrainConfig(model=str(tiny_model_dir), data=str(write_jsonl(tmp_path / "d.jsonl", _examples(6, seed=6))),
                      output_dir=str(tmp_path / "o"), loss="kto", max_length=64, max_prompt_length=32)
    pairs = load_splits(DataSettings.of(cfg), tok, "unpaired")[0].pairs
    orders = [TrainOrder(pairs, b, a, seed=1) for b, a in ((4, 1), (2, 2))]
    assert orders[0].global_batch(0) == orders[1].global_batch(0)
    kw = dict(pad_id=tok.pad_token_id, batch_size=3, autocast=None, placement=Placement())
    mism = MismatchedPairs({"train": pairs}, orders[1], max_length=64,
                           policy=lambda ex: score_answers(forward_handle(policy), ex, reference=False, **kw),
                           reference=lambda s, pos, ex: score_answers(forward_handle(ref), ex, reference=True, **kw))
    total, count = mism.step(0)
    batch = orders[0].global_batch(0)
    with torch.no_grad():
        plain = [(row_logp(policy, pairs[i].prompt_ids, pairs[j].chosen_ids), row_logp(ref, pairs[i].prompt_ids,
                                                                                     pairs[j].chosen_ids))
                 for i, j in zip(batch, batch[-1:] + batch[:-1])]
    pol, rf = (np.array([float(x[k]) for x in plain]) for k in (0, 1))
    assert count == 4 and total == pytest.approx(float((pol - rf).sum()), abs=1e-4)
    assert max(0.0, total / count) == pytest.approx(numpy_kto_reference_point(pol, rf), abs=1e-4)


@pytest.mark.parametrize(("rows", "flags", "needle"), [
    ([{"prompt": "p:", "completion": " a", "label": "yes"}] + _examples(1, 1), ["--loss", "kto"],
     "field 'label' is 'yes', expected true or false (or 1 or 0)"),
    (_examples(2, 1, desirable_only=True), ["--loss", "kto"],
     "the training data holds only desirable examples; KTO weighs desirable against undesirable answers"),
    (_examples(2, 1), ["--loss", "kto+sigmoid"], "kto trains on unpaired examples (one answer with a desirable/"
                                                 "undesirable label) and sigmoid on pairs; use them in separate runs."),
    (_examples(2, 1), ["--loss", "kto", "--sft-weight", "1"], "sft_weight applies to pairs"),
    (_examples(2, 1), ["--loss", "sigmoid"], "looks like unpaired KTO-style data (prompt, completion, label); train it "
                                             "with --loss kto"),
])
def test_bad_input_exits_2(tmp_path, tiny_model_dir, capsys, rows, flags, needle):
    out = tmp_path / "out"
    assert _cli(tiny_model_dir, write_jsonl(tmp_path / "d.jsonl", rows), out, "--max-steps", "1", *flags) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err, err
    assert not out.exists()


def test_inspect_counts_the_labels(tmp_path, tiny_model_dir, capsys):
    rows = _examples(1, 2) + _examples(3, 3, desirable_only=True)  # 4 desirable, 1 undesirable
    assert main(["inspect", str(write_jsonl(tmp_path / "d.jsonl", rows)), "--tokenizer", str(tiny_model_dir),
                 "--show", "1", "--output", str(tmp_path / "r.json")]) == 0
    printed = capsys.readouterr().out
    assert "labels: 4 desirable, 1 undesirable" in printed and "example 1, desirable" in printed
    assert "warning: labels are imbalanced (4 desirable vs 1 undesirable): the KTO paper keeps" in printed
    report = json.loads((tmp_path / "r.json").read_text())
    assert (report["desirable"], report["undesirable"], report["lengths"]["unit"]) == (4, 1, "tokens")
    assert (report["lengths"]["desirable"]["count"], report["lengths"]["undesirable"]["count"]) == (4, 1)
    assert sum(report["lengths"]["histograms"]["desirable"]["counts"]) == 4
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (tmp_path / "r.html").read_text()
    assert "<th>desirable</th><td class='n'>4 of 5 (80.0%)</td>" in page and "labels are imbalanced" in page
    assert "wrote " + str(tmp_path / "r.json") in printed


def test_inspect_page_of_unpaired_data_escapes_and_never_writes_through_a_link(tmp_path, tiny_model_dir, capsys):
    """A completion holding markup is shown as text on the page; a link planted where the page goes is refused
    in one sentence (exit 2) and its target keeps its bytes."""
    rows = _examples(2, 2)
    rows[0]["completion"] = "<script>alert(1)</script>"
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    assert main(["inspect", str(data), "--output", str(tmp_path / "r.json")]) == 0
    page = (tmp_path / "r.html").read_text()
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    mine = tmp_path / "mine.txt"
    mine.write_text("keep")
    (tmp_path / "s.html").symlink_to(mine)
    capsys.readouterr()
    assert main(["inspect", str(data), "--output", str(tmp_path / "s.json")]) == 2
    err = capsys.readouterr().err
    assert "symbolic link" in err and "Traceback" not in err, err
    assert mine.read_text() == "keep"
