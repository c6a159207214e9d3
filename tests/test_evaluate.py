"""preftune.evaluate / preftune.judging and `preftune eval`: figures equal values computed here with plain
one-sequence forwards; the win rate and its Wilson interval on a hand-made set; judges load by name."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch
from helpers import make_pairs

from preftune.cli import main
from preftune.errors import PreftuneError
from preftune.evaluate import evaluate
from preftune.generate import encode_prompt, generate_ids, load_model_for_generation
from preftune.judging import judge_pairs, load_judge, wilson_interval, win_rate

BETA = 0.5


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    """(M, R, tokenizer): R is the tiny model, M the same with seeded noise on every weight."""
    ref, tok = load_model_for_generation(str(tiny_model_dir), device="cpu")
    model, _ = load_model_for_generation(str(tiny_model_dir), device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model, ref, tok


def _logp(model, prompt_ids: list[int], answer_ids: list[int]) -> float:
    """Summed log-prob of answer_ids after prompt_ids from one unpadded forward."""
    ids = torch.tensor([prompt_ids + answer_ids])
    with torch.no_grad():
        logps = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
    targets = ids[0, 1:]
    return float(logps[torch.arange(len(targets)), targets][len(prompt_ids) - 1:].sum())


def _pair_ids(tok, record: dict) -> tuple[list[int], list[int], list[int]]:
    # The tiny BPE pre-tokenizes at spaces and answers start with one, so the prompt's ids are a prefix.
    p = tok(record["prompt"])["input_ids"]
    c, r = (tok(record["prompt"] + record[k])["input_ids"] for k in ("chosen", "rejected"))
    assert c[:len(p)] == p and r[:len(p)] == p
    return p, c[len(p):] + [tok.eos_token_id], r[len(p):] + [tok.eos_token_id]


def test_preference_figures_equal_direct_computation(models):
    model, ref, tok = models
    records = make_pairs(10, seed=3)
    res = evaluate(model, tok, records, reference=ref, beta=BETA, generate=0, kl_samples=0, batch_size=4)
    margins, chosen_r, rejected_r, mc = [], [], [], []
    for rec in records:
        p, c, r = _pair_ids(tok, rec)
        cr, rr = BETA * (_logp(model, p, c) - _logp(ref, p, c)), BETA * (_logp(model, p, r) - _logp(ref, p, r))
        margins.append(cr - rr)
        chosen_r.append(cr)
        rejected_r.append(rr)
        mc.append(_logp(model, p, c))
    pref = res["preference"]
    # Batched padded fp32 forwards vs one-sequence fp64 log-softmax: sums of ~20 log-probs of ~-5 agree to ~1e-5.
    assert pref["pairs"] == 10
    assert pref["accuracy"] == sum(m > 0 for m in margins) / 10
    assert pref["margin"]["mean"] == pytest.approx(sum(margins) / 10, abs=1e-4)
    assert pref["margin"]["median"] == pytest.approx(float(torch.tensor(margins).double().quantile(0.5)), abs=1e-4)
    assert pref["margin"]["max"] == pytest.approx(max(margins), abs=1e-4)
    assert pref["reward_chosen_mean"] == pytest.approx(sum(chosen_r) / 10, abs=1e-4)
    assert pref["reward_rejected_mean"] == pytest.approx(sum(rejected_r) / 10, abs=1e-4)
    assert pref["logps"]["model"]["chosen"] == pytest.approx(sum(mc) / 10, abs=1e-3)
    assert sum(pref["margin_histogram"]["counts"]) == 10
    assert "kl" not in res and "lengths" not in res


def test_kl_on_the_models_own_samples_equals_direct_computation(models):
    model, ref, tok = models
    records = make_pairs(6, seed=4)
    res = evaluate(model, tok, records, reference=ref, beta=BETA, generate=0, kl_samples=5, max_new_tokens=8,
                   seed=3, batch_size=4)
    # The same draws (generation itself is tested in test_generate.py), scored here one sequence at a time.
    ids = [encode_prompt(tok, r["prompt"]) for r in records[:5]]
    samples = [a for a, _ in generate_ids(model, tok, ids, max_new_tokens=8, temperature=1.0, seed=3, batch_size=4,
                                          pure=True)]
    diffs = [_logp(model, p, a) - _logp(ref, p, a) for p, a in zip(ids, samples)]
    tokens = sum(len(a) for a in samples)
    assert res["kl"]["samples"] == 5 and res["kl"]["tokens"] == tokens
    assert res["kl"]["per_token"] == pytest.approx(sum(diffs) / tokens, abs=1e-5)
    assert res["kl"]["per_sequence"] == pytest.approx(sum(diffs) / 5, abs=1e-4)


def test_a_model_against_itself(models):
    _, ref, tok = models
    res = evaluate(ref, tok, make_pairs(6, seed=5), reference=ref, generate=3, kl_samples=3, max_new_tokens=6,
                   judge=lambda prompt, a, b: "tie" if a == b else "a")
    assert res["kl"]["per_token"] == 0.0 and res["preference"]["margin"]["max"] == 0.0
    assert res["preference"]["accuracy"] == 0.0  # a zero margin is not "ranked right", as in training
    assert res["lengths"]["model"] == res["lengths"]["reference"]
    assert (res["judge"]["ties"], res["judge"]["win_rate"]) == (3, 0.5)


def test_wilson_interval_known_values():
    # 7/10: p=0.7, z²=3.8415: centre 0.89207/1.38415 = 0.64449, half 1.41600·sqrt(0.021 + 0.0096037) = 0.24771.
    assert wilson_interval(7, 10) == pytest.approx((0.39678, 0.89220), abs=1e-5)
    # 0/10: the upper end is z²/(n + z²) = 3.8415/13.8415 = 0.27753 (the "rule of three" neighbourhood).
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.27753), abs=1e-5)


JUDGE_MODULE = '''
def prefers_yes(prompt, answer_a, answer_b):
    a, b = "yes" in answer_a, "yes" in answer_b
    return "tie" if a == b else ("a" if a else "b")

def always_a(prompt, answer_a, answer_b):
    return "A"

def two_args(prompt, answer):
    return "a"

def shouts(prompt, a, b):
    return "both"

def breaks(prompt, a, b):
    raise ValueError("no key")
'''


@pytest.fixture
def judge_module(tmp_path, monkeypatch):
    (tmp_path / "pairwise_judges.py").write_text(JUDGE_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "pairwise_judges", raising=False)  # each test's own file, not a cached one
    return tmp_path / "pairwise_judges.py"


def test_win_rate_on_a_hand_made_set(judge_module):
    """10 prompts: the model's answer alone says yes on 6 (wins), the reference's alone on 2 (losses), both on 1
    and neither on 1 (ties): win rate (6 + 2/2)/10 = 0.7, Wilson interval of 7/10 (see above)."""
    judge = load_judge("pairwise_judges:prefers_yes")
    model = ["yes"] * 6 + ["no"] * 2 + ["yes", "no"]
    reference = ["no"] * 6 + ["yes"] * 2 + ["yes", "no"]
    rows = judge_pairs(judge, [f"p{i}" for i in range(10)], model, reference, seed=1)
    assert {r["model_shown_as"] for r in rows} == {"a", "b"}  # both positions were used
    result = win_rate([r["verdict"] for r in rows])
    assert (result["wins"], result["losses"], result["ties"], result["win_rate"]) == (6, 2, 2, 0.7)
    assert result["ci95"] == pytest.approx([0.39678, 0.89220], abs=1e-5)
    # A judge that always answers "a" wins exactly where the model was shown first.
    rows = judge_pairs(load_judge(f"{judge_module}:always_a"), ["p"] * 10, model, reference, seed=1)
    assert all((r["verdict"] == "model") == (r["model_shown_as"] == "a") for r in rows)


def test_judge_errors_are_one_sentence(judge_module):
    for spec, match in (("no_such_module_x:f", "cannot import the judge module 'no_such_module_x'"),
                        ("pairwise_judges:missing", "has no function 'missing'"),
                        ("pairwise_judges:two_args", "cannot be called as judge\\(prompt, answer_a, answer_b\\)"),
                        ("pairwise_judges", "named as 'module:function'")):
        with pytest.raises(PreftuneError, match=match):
            load_judge(spec)
    with pytest.raises(PreftuneError, match="returned 'both' for prompt 1; it must return 'a', 'b' or 'tie'"):
        judge_pairs(load_judge("pairwise_judges:shouts"), ["p"], ["x"], ["y"])
    with pytest.raises(PreftuneError, match="raised ValueError on prompt 1: no key"):
        judge_pairs(load_judge("pairwise_judges:breaks"), ["p"], ["x"], ["y"])


def test_cli_eval_of_a_run_matches_its_last_evaluation(tiny_dpo_run, eval_pairs_file, judge_module, tmp_path,
                                                       capsys):
    """Defaults come from the run (reference = its starting model, beta, lengths); on the run's own eval data
    the accuracy and mean margin equal the training loop's final eval row (a separate implementation)."""
    shutil.copytree(tiny_dpo_run, tmp_path / "run")
    tiny_dpo_run = tmp_path / "run"
    assert main(["eval", "--model", str(tiny_dpo_run / "final"), "--data", str(eval_pairs_file), "--generate", "4",
                 "--kl-samples", "4", "--max-new-tokens", "8", "--judge", "pairwise_judges:prefers_yes",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "preference accuracy" in out and "win rate" in out
    result = json.loads((tiny_dpo_run / "eval.json").read_text())
    last_eval = [json.loads(ln) for ln in (tiny_dpo_run / "metrics.jsonl").read_text().splitlines()
                 if '"eval"' in ln][-1]
    assert result["beta"] == 0.1 and result["preference"]["pairs"] == 48
    assert result["preference"]["accuracy"] == pytest.approx(last_eval["rewards/accuracies"], abs=1e-9)
    assert result["preference"]["margin"]["mean"] == pytest.approx(last_eval["rewards/margins"], abs=1e-5)
    assert result["judge"]["n"] == 4 and len(result["side_by_side"]) == 4


def test_cli_eval_without_a_reference_is_one_sentence(tiny_model_dir, eval_pairs_file, capsys):
    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(eval_pairs_file)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("preftune: error: no reference model given") and "\n" not in err
