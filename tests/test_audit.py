"""The data audit behind `preftune inspect` (preftune.audit)."""

from __future__ import annotations

import base64
import json
import math

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from preftune.audit import audit, format_audit, write_audit
from preftune.errors import PreftuneError

ROWS = [
    '{"prompt": "What is the capital of France?", "chosen": "The capital of France is called Paris.", '
    '"rejected": "Rome."}',
    '{"prompt": "What is the capital of France?", "chosen": "The capital of France is called Paris.", '
    '"rejected": "Rome."}',
    '{"prompt": "what is the capital of  france?", "chosen": "the capital of france is called paris.", '
    '"rejected": "rome."}',
    '{"prompt": "Name a prime number.", "chosen": "Seven", "rejected": "Nine is one"}',
    '{"prompt": "Say hi", "chosen": "Hi", "rejected": "HI"}',
    '{"prompt": "Tell me a long story about a dragon and a knight please", '
    '"chosen": "Once upon a time a dragon met a knight and they became friends", "rejected": "No"}',
    "not json",
    '{"prompt": "x", "chosen": "y"}',
]


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "audit.jsonl"
    path.write_text("\n".join(ROWS) + "\n")
    return path


def test_audit_figures_in_words(data_file):
    """Hand-derived from ROWS (whitespace words, max_length 12, max_prompt_length 8).

    Valid pairs (lines 1-6), words (prompt, chosen, rejected):
    (6,7,1) (6,7,1) (6,7,1) (4,1,3) (2,1,1) (12,13,1).
    Invalid: line 7 not JSON, line 8 missing 'rejected'; 8 rows read.
    Duplicates: line 2 repeats line 1 (exact = 1); line 3 equals line 1 after lower-casing and collapsing
    spaces (near = 2 normalised copies - 1 exact = 1); line 5 "Hi" vs "HI" is near-identical (1).
    Prompts: 5 distinct (line 3's prompt differs in case), 6 / 5 = 1.2 pairs each, top is line 1's with 2.
    Prompt lengths sorted [2,4,6,6,6,12]: median (6+6)/2 = 6, p95 at 0.95*5 = 4.75 -> 6 + 0.75*(12-6) = 10.5,
    mean 36/6 = 6. Chosen [1,1,7,7,7,13]: median 7, p95 7 + 0.75*6 = 11.5, mean 36/6 = 6.
    Rejected [1,1,1,1,1,3]: median 1, p95 1 + 0.75*2 = 2.5, mean 8/6 = 1.3333.
    Truncation: prompt > 8 only line 6 (1); max(chosen, rejected) > 12 - min(prompt, 8): lines 1-3 (7 > 6)
    and line 6 (13 > 4), so 4; nothing dropped.
    Length bias: chosen longer in lines 1,2,3,6 = 4/6 = 0.6667 (> 0.65: warning), shorter in line 4 (1/6),
    equal in line 5 (1/6); mean difference (6+6+6-2+0+12)/6 = 28/6 = 4.6667.
    Glued prompt/answer (a letter or digit on both sides, no space): line 5 "Say hi"+"Hi", line 6 "please"+"Once".
    """
    r = audit(data_file, max_length=12, max_prompt_length=8)
    assert (r["format"], r["pairs"], r["rows_read"]) == ("standard", 6, 8)
    assert r["invalid"]["count"] == 2
    assert r["invalid"]["by_reason"] == {"not valid JSON": 1, "missing field 'rejected'": 1}
    assert r["duplicates"]["exact"] == 1 and r["duplicates"]["near"] == 1
    assert r["duplicates"]["near_identical_pairs"] == 1
    assert r["duplicates"]["exact_examples"] == [f"{data_file} line 2 repeats {data_file} line 1"]
    assert r["prompts"]["distinct"] == 5 and r["prompts"]["mean_pairs_per_prompt"] == 1.2
    assert r["prompts"]["top"][0] == {"prompt": "What is the capital of France?", "pairs": 2}

    ln = r["lengths"]
    assert ln["unit"] == "words"
    assert ln["prompt"] == {"count": 6, "min": 2, "median": 6, "p95": 10.5, "max": 12, "mean": 6}
    assert ln["chosen"] == {"count": 6, "min": 1, "median": 7, "p95": 11.5, "max": 13, "mean": 6}
    assert ln["rejected"] == {"count": 6, "min": 1, "median": 1, "p95": 2.5, "max": 3, "mean": 1.3333}
    # one unit-wide bin per integer value from 2 to 12: counts at 2, 4, 6, 12
    hist = ln["histograms"]["prompt"]
    assert hist["edges"][0] == 1.5 and hist["edges"][-1] == 12.5
    assert hist["counts"] == [1, 0, 1, 0, 3, 0, 0, 0, 0, 0, 1]

    assert r["truncation"] == {
        "unit": "words",
        "max_length": 12,
        "max_prompt_length": 8,
        "prompt_truncated": 1,
        "completion_truncated": 4,
        "dropped_empty": 0,
        "dropped_identical": 0,
        "identical_causes": {},
    }
    lb = r["length_bias"]
    assert (lb["chosen_longer"], lb["chosen_shorter"], lb["equal"]) == (0.6667, 0.1667, 0.1667)
    assert lb["mean_difference"] == 4.6667
    assert r["model"] is None

    warnings = "\n".join(r["warnings"])
    assert "2 invalid rows were dropped" in warnings
    assert "1 exact duplicate pairs" in warnings
    assert "1 pairs whose chosen and rejected differ only in case/whitespace" in warnings
    # 4 longer, 1 shorter, 1 equal: among the 5 unequal pairs chosen is longer in 4/5 = 80%
    assert lb["chosen_longer_among_unequal"] == 0.8
    assert "chosen is the longer one in 80.0% of pairs" in warnings
    assert "1 of 6 (16.7%) pairs would have their prompts truncated" in warnings
    assert "4 of 6 (66.7%) pairs would have their answers truncated" in warnings
    assert f"2 of 6 pairs run the prompt's last word into the answer's first with no space between ({data_file} " \
           "line 5: ...'Say hi' + 'Hi'...)" in warnings
    assert len(r["warnings"]) == 7

    text = format_audit(r)
    assert "whitespace words, not tokens" in text
    assert "prompt   min 2  median 6  p95 10.5  max 12  mean 6" in text
    assert "chosen longer in 66.7%, shorter in 16.7%, equal in 16.7%; mean chosen - rejected +4.67" in text


def test_audit_is_json_and_writes_png_and_html(data_file, tmp_path):
    r = audit(data_file, max_length=12, max_prompt_length=8)
    write_audit(r, tmp_path / "out" / "report.json", tmp_path / "out" / "report.html")
    assert json.loads((tmp_path / "out" / "report.json").read_text()) == r
    page = (tmp_path / "out" / "report.html").read_text()
    start = page.index("data:image/png;base64,") + len("data:image/png;base64,")
    png = base64.b64decode(page[start : page.index("'", start)])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert "chosen is the longer one in 80.0% of pairs" in page
    write_audit(r, tmp_path / "report.json", tmp_path / "hist.png")
    assert (tmp_path / "hist.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(PreftuneError, match="use a .png or .html file name"):
        write_audit(r, tmp_path / "report.json", tmp_path / "hist.pdf")


def test_bad_limits_and_missing_tokenizer(data_file):
    with pytest.raises(PreftuneError, match="must be at least 1 and below max_length"):
        audit(data_file, max_length=8, max_prompt_length=8)
    with pytest.raises(PreftuneError, match="needs its tokenizer"):
        audit(data_file, model=object())


def word_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level vocabulary with every word of the records below; no BOS is added to encodings."""
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    words = ["the sky is blue green red", "one two three four five six seven eight"]
    tok.train_from_iterator(
        words, trainers.WordLevelTrainer(special_tokens=["<unk>", "<pad>", "<s>", "</s>"])
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


TOKEN_RECORDS = [
    {"prompt": "the sky is", "chosen": " blue", "rejected": " green red"},
    {"prompt": "one two three four five", "chosen": " six seven eight", "rejected": " six"},
    {"prompt": "one", "chosen": " two three four five six seven", "rejected": " two"},
]


def test_token_lengths_and_truncation_match_training(tmp_path):
    """Word-level tokens, EOS appended to each answer:
    prompts 3, 5, 1 tokens; chosen 1+1, 3+1, 6+1 = 2, 4, 7; rejected 2+1, 1+1, 1+1 = 3, 2, 2.
    max_length 6, max_prompt_length 4: prompt 2 (5 > 4) is truncated; answers: pair 1 max(2,3) = 3 <= 6-3,
    pair 2 max(4,2) = 4 > 6-4 = 2, pair 3 7 > 6-1 = 5 -> 2 truncated. Chosen longer: pair 2 and 3 (2/3);
    mean difference ((2-3) + (4-2) + (7-2)) / 3 = 2. Training's own tokenizer statistics agree."""
    from preftune.data.encode import tokenize_records

    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in TOKEN_RECORDS))
    tok = word_tokenizer()
    r = audit(path, tokenizer=tok, max_length=6, max_prompt_length=4)
    assert r["lengths"]["unit"] == "tokens"
    assert (r["lengths"]["prompt"]["min"], r["lengths"]["prompt"]["max"]) == (1, 5)
    assert (r["lengths"]["chosen"]["median"], r["lengths"]["rejected"]["mean"]) == (4, 2.3333)
    assert (r["truncation"]["prompt_truncated"], r["truncation"]["completion_truncated"]) == (1, 2)
    assert r["length_bias"]["chosen_longer"] == 0.6667 and r["length_bias"]["mean_difference"] == 2
    texts = [(x["prompt"], x["chosen"], x["rejected"]) for x in TOKEN_RECORDS]
    _, stats = tokenize_records(tok, texts, max_length=6, max_prompt_length=4)
    assert (stats.prompt_truncated, stats.completion_truncated) == (1, 2)


def test_model_margins_from_score_pairs(data_file, monkeypatch):
    """Fake scores for the 6 valid pairs (pair 4 left out as if dropped):
    chosen_logps [-2, -2, -3, _, -10, -1], rejected_logps [-4, -4, -1, _, -9, -21],
    lengths chosen [2, 2, 3, _, 5, 1], rejected [4, 4, 1, _, 1, 7].
    margins = [2, 2, -2, -1, 20]: prefers chosen 3/5 = 0.6; median of sorted [-2,-1,2,2,20] = 2.
    per token: -1-(-1) = 0, 0, -1-(-1) = 0, -2-(-9) = 7, -1-(-3) = 2 -> 2/5 = 0.4 strictly positive.
    Largest |margin|: line 6 (+20) first, then the 2s and -2s in record order (stable sort), last line 5 (-1).
    """
    import preftune.scoring as scoring

    def fake(model, tokenizer, records, *, max_length, max_prompt_length, batch_size):
        assert len(records) == 6 and (max_length, max_prompt_length, batch_size) == (12, 8, 3)
        t = torch.tensor
        return {
            "chosen_logps": t([-2.0, -2.0, -3.0, -10.0, -1.0]),
            "rejected_logps": t([-4.0, -4.0, -1.0, -9.0, -21.0]),
            "chosen_lengths": t([2.0, 2.0, 3.0, 5.0, 1.0]),
            "rejected_lengths": t([4.0, 4.0, 1.0, 1.0, 7.0]),
            "kept": [0, 1, 2, 4, 5],
        }

    monkeypatch.setattr(scoring, "score_records", fake)
    r = audit(
        data_file,
        tokenizer=word_tokenizer(),
        model=object(),
        max_length=12,
        max_prompt_length=8,
        batch_size=3,
    )
    m = r["model"]
    assert m["scored"] == 5 and m["prefers_chosen"] == 0.6 and m["prefers_chosen_per_token"] == 0.4
    assert m["margin"]["median"] == 2 and m["margin"]["min"] == -2 and m["margin"]["max"] == 20
    assert [x["margin"] for x in m["largest"]] == [20, 2, 2, -2, -1]
    assert [x["where"] for x in m["largest"]][0] == f"{data_file} line 6"
    assert m["largest"][3]["verdict"] == "prefers rejected"
    assert (
        "model preference over 5 pairs: prefers chosen in 60.0% (summed log-prob), 40.0% (per token)"
        in format_audit(r)
    )
    assert not any("too easy" in w or "noisy" in w for w in r["warnings"])


def _tiny_llama(tok) -> LlamaForCausalLM:
    """A one-layer random Llama (seed 0) over the word-level tokenizer's vocabulary."""
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32))


def test_real_model_margin_matches_a_plain_forward(tmp_path):
    """With the lead's score_pairs on a tiny random Llama, the reported margin of the single pair equals
    sum log p(chosen tokens) - sum log p(rejected tokens) from one plain forward each. The ids come from the
    word-level tokenizer alone (whitespace-split words, so prompt + answer encodes as the two encodings
    joined), plus EOS after each answer, not from preftune's tokenization."""
    tok = word_tokenizer()
    model = _tiny_llama(tok).eval()
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps(TOKEN_RECORDS[0]))
    r = audit(path, tokenizer=tok, model=model, max_length=16, max_prompt_length=8)

    rec = TOKEN_RECORDS[0]
    prompt_ids = tok(rec["prompt"])["input_ids"]
    chosen_ids, rejected_ids = (tok(rec[k])["input_ids"] + [tok.eos_token_id] for k in ("chosen", "rejected"))
    assert (len(prompt_ids), len(chosen_ids), len(rejected_ids)) == (3, 2, 3)

    def logp(answer: list[int]) -> float:
        ids = torch.tensor([prompt_ids + answer])
        with torch.no_grad():
            logits = model(ids).logits.float().log_softmax(-1)[0]
        return sum(logits[len(prompt_ids) - 1 + i, t].item() for i, t in enumerate(answer))

    expected = logp(chosen_ids) - logp(rejected_ids)
    assert r["model"]["scored"] == 1
    assert math.isclose(r["model"]["margin"]["median"], round(expected, 4), abs_tol=2e-4)


def test_cli_inspect_writes_json_png_html(data_file, tmp_path, capsys):
    """`preftune inspect DATA --output r.json` prints the audit and writes r.json, r.png, r.html (exit 0);
    with --model it loads a saved model folder and adds the margin section. A missing file exits 2."""
    from preftune.cli import main

    out = tmp_path / "r.json"
    assert (
        main(
            [
                "inspect",
                str(data_file),
                "--max-length",
                "12",
                "--max-prompt-length",
                "8",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "length bias (words): chosen longer in 66.7%" in printed
    assert json.loads(out.read_text())["truncation"]["completion_truncated"] == 4
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    assert "data:image/png;base64," in (tmp_path / "r.html").read_text()

    tok = word_tokenizer()
    _tiny_llama(tok).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps(r) for r in TOKEN_RECORDS))
    assert (
        main(
            [
                "inspect",
                str(pairs),
                "--model",
                str(tmp_path / "model"),
                "--max-length",
                "16",
                "--max-prompt-length",
                "8",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "lengths (tokens as training tokenizes them" in printed
    assert "model preference over 3 pairs" in printed

    assert main(["inspect", str(tmp_path / "missing.jsonl")]) == 2
    assert "data file" in capsys.readouterr().err


def test_show_examples_as_training_sees_them(tmp_path, capsys):
    """`inspect --tokenizer T --show 1`: the first pair with its token pieces (word tokens, EOS appended:
    prompt the sky is | blue </s>), in the terminal text and under `examples` in the JSON report.
    --prompt-template builds the prompt from two fields; a negative --show and --model with --tokenizer exit 2."""
    from preftune.cli import main

    tok = word_tokenizer()
    tok.save_pretrained(tmp_path / "tok")
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in TOKEN_RECORDS))
    out = tmp_path / "r.json"
    assert main(["inspect", str(path), "--tokenizer", str(tmp_path / "tok"), "--show", "1", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"example 1 as training sees it ({path} line 1):\n  prompt   'the sky is'\n  chosen   ' blue'\n" in printed
    assert "  chosen start    'the' 'sky' 'is' | 'blue' '</s>'\n" in printed
    ex = json.loads(out.read_text())["examples"][0]  # the page shows up to 3
    assert ex["tokens"]["rejected_start"] == ["green", "red", "</s>"] and ex["tokens"]["chosen_eos"] == "added"

    split = tmp_path / "split.jsonl"
    split.write_text(json.dumps({"a": "the sky", "b": "is", "chosen": " blue", "rejected": " red"}))
    r = audit(split, tokenizer=tok, show=1, prompt_template="{a} {b}")
    assert r["examples"][0]["prompt"] == "the sky is" and r["examples"][0]["tokens"]["prompt"] == 3
    assert main(["inspect", str(path), "--show", "-1"]) == 2
    assert main(["inspect", str(path), "--model", "m", "--tokenizer", "t"]) == 2
    assert "not both" in capsys.readouterr().err


def test_pairs_identical_after_truncation_are_counted_as_training_drops_them(tmp_path):
    """Word tokens, max_length 4, max_prompt_length 3: "the sky is" leaves room for one answer token, so
    "blue green"+EOS and "blue red"+EOS both become "blue": dropped, as tokenize_records drops it."""
    from preftune.data.encode import tokenize_records

    rows = [{"prompt": "the sky is", "chosen": " blue green", "rejected": " blue red"},
            {"prompt": "the sky is", "chosen": " blue", "rejected": " red"}]
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    r = audit(path, tokenizer=word_tokenizer(), max_length=4, max_prompt_length=3)
    tr = r["truncation"]
    assert (tr["completion_truncated"], tr["dropped_identical"], tr["dropped_empty"]) == (2, 1, 0)
    assert "1 pairs would be dropped: chosen and rejected identical after truncation: no signal" in r["warnings"]
    _, stats = tokenize_records(word_tokenizer(), [(x["prompt"], x["chosen"], x["rejected"]) for x in rows],
                                max_length=4, max_prompt_length=3)
    assert (stats.completion_truncated, stats.dropped_identical) == (2, [0])


def test_one_pair_gives_no_model_share_warning_twenty_do(tmp_path):
    """A share of one pair is 0% or 100%: the noisy-label (and too-easy) warning needs 20 scored pairs. 24 pairs
    whose chosen has 9 tokens and rejected 2 ("blue" + EOS) are all preferred rejected by a random model (a summed
    log-prob of 9 tokens is far below one of 2): 0.0%, the warning fires."""
    tok = word_tokenizer()
    model = _tiny_llama(tok).eval()
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps(TOKEN_RECORDS[0]))
    r = audit(one, tokenizer=tok, model=model, max_length=16, max_prompt_length=8)
    assert r["model"]["scored"] == 1 and not [w for w in r["warnings"] if "model" in w]
    many = tmp_path / "many.jsonl"
    row = {"prompt": "the sky is", "chosen": " one two three four five six seven eight", "rejected": " blue"}
    many.write_text("\n".join(json.dumps(row) for _ in range(24)))
    r = audit(many, tokenizer=tok, model=model, max_length=16, max_prompt_length=8)
    assert "the model prefers chosen in only 0.0% of pairs: the labels may be noisy or swapped" in "\n".join(
        r["warnings"])


def test_inspect_truncates_at_the_limits_train_uses(tmp_path, tiny_model_dir, capsys):
    """The tiny model has 256 positions: train caps max_length 1024 to 256 and max_prompt_length 512 to 128, and so
    does inspect (before: it counted at 1024/512 and reported no truncation). Rows: two 200-word prompts ("red" is
    one token or two: 200 to 400 tokens, over 128, under 512), one 300-word answer (over 256 - its short prompt,
    under 1024), one short pair. Train and inspect both say: 2 prompts truncated, 1 answer truncated."""
    from preftune.cli import main
    from preftune.config import TrainConfig
    from preftune.data.splits import DataSettings, load_splits
    from preftune.modeling.load import context_length, load_tokenizer

    rows = [{"prompt": "question: " + "red " * 200 + "answer:", "chosen": " yes", "rejected": " no"},
            {"prompt": "question: " + "blue " * 200 + "answer:", "chosen": " yes good", "rejected": " no bad"},
            {"prompt": "question: red answer:", "chosen": " yes" + " dog" * 300, "rejected": " no"},
            {"prompt": "question: cat answer:", "chosen": " yes", "rejected": " no"}]
    path = tmp_path / "long.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    cfg, note = TrainConfig(model=str(tiny_model_dir), data=str(path), output_dir="unused", progress=False) \
        .fit_to_context(context_length(str(tiny_model_dir)))
    assert note == "max_length 1024 is more than the model's 256 positions: capped it to 256 and max_prompt_length " \
                   "512 to 128"
    train, _ = load_splits(DataSettings.of(cfg), load_tokenizer(str(tiny_model_dir)), "dpo")
    assert "train tokenized: 4 kept, 2 prompts truncated (left), 1 answers truncated (right)" in train.summary
    assert main(["inspect", str(path), "--tokenizer", str(tiny_model_dir)]) == 0
    printed = capsys.readouterr().out
    assert note in printed
    assert ("truncation at max_length 256 / max_prompt_length 128 (tokens): 2 of 4 (50.0%) prompts truncated, "
            "1 of 4 (25.0%) answers truncated") in printed
