"""The reference-free losses from the command line: ORPO trains with no reference pass and says so in its first
lines, its step-1 loss equals the paper's formula on log-probs computed here independently, and a reference
setting that cannot apply is one sentence, exit status 2, nothing written."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import make_pairs, write_jsonl
from independent import hand_ids, numpy_losses, row_logp

from preftune.cli import main


def _cli(model, data, out, *extra):
    return main(["train", "--model", str(model), "--data", str(data), "--output-dir", str(out), "--max-steps", "1",
                 "--max-length", "64", "--max-prompt-length", "32", "--progress", "false", *extra])


@pytest.mark.parametrize(("flags", "needle"), [
    (["--loss", "orpo", "--reference", "copy"], "reference 'copy' has no use with loss orpo: it needs no reference"),
    (["--loss", "cpo", "--reference-model", "x"], "reference_model has no use with loss cpo"),
    (["--loss", "sigmoid", "--reference", "none"], "reference 'none' leaves no reference model, but sigmoid"),
    (["--loss", "exo_pair"], "exo_pair needs label_smoothing > 0"),
    (["--loss", "apo_zero", "--f-divergence-type", "forward_kl"], "forward_kl does not apply to apo_zero"),
    (["--sync-ref-model", "true", "--reference", "precomputed"], "TR-DPO (sync_ref_model) moves the reference during "
     "training, so its log-probs cannot be precomputed; use reference copy."),
    (["--sync-ref-model", "true", "--lora", "true"], "TR-DPO (sync_ref_model) needs a reference model of its own"),
    (["--use-weighting", "true", "--loss", "sigmoid+aot"], "use_weighting (WPO) weighs each pair, but aot sorts"),
    (["--ld-alpha", "2"], "ld_alpha must be in [0, 1] (got 2"),
])
def test_impossible_settings_exit_2_one_sentence(tmp_path, tiny_model_dir, pairs_file, capsys, flags, needle):
    out = tmp_path / "out"
    assert _cli(tiny_model_dir, pairs_file, out, *flags) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_orpo_from_the_command_line(tmp_path, tiny_model_dir, capsys):
    """4 pairs in one batch, λ = β = 0.25. Before training the run says it has no reference; no reference_logps/
    is written. The step-1 loss is the mean over the pairs of -pc/|c| + λ·(-logσ(log odds ratio)) (independent's
    numpy ORPO), with pc, pr from one unpadded forward of the initial model per answer: batched fp32 log-probs
    differ from those by ~1e-6 (tests/test_scoring.py), so 1e-4."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = make_pairs(4, seed=24)
    out = tmp_path / "run"
    assert _cli(tiny_model_dir, write_jsonl(tmp_path / "d.jsonl", rows), out, "--loss", "orpo", "--beta", "0.25",
                "--batch-size", "4", "--learning-rate", "1e-3") == 0
    printed = capsys.readouterr().out
    assert "reference: none — loss orpo needs no reference model (no reference pass" in printed
    assert not (out / "reference_logps").exists()
    model, tok = AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)
    stats = {"pc": [], "pr": [], "lc": [], "lr": []}
    with torch.no_grad():
        for r in rows:
            for side, key in (("chosen", "c"), ("rejected", "r")):
                p, a = hand_ids(tok, r["prompt"], r[side])
                stats["p" + key].append(float(row_logp(model, p, a)))
                stats["l" + key].append(float(len(a)))
    s = {k: np.array(v) for k, v in stats.items()}
    want = numpy_losses("orpo", s["pc"], s["pr"], None, None, s["lc"], s["lr"], beta=0.25).mean()
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1 and first["loss"] == pytest.approx(want, abs=1e-4)
    assert first["rewards/chosen"] == pytest.approx(0.25 * np.mean(s["pc"] / s["lc"]), abs=1e-5)
    assert "kl" not in first
