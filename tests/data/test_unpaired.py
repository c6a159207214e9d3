"""Unpaired examples (preftune.data.unpaired): KTO's labelled rows read, checked and tokenized with their labels;
pairs split into a desirable and an undesirable example; the label balance rule; what the summary says."""

from __future__ import annotations

import pytest

from preftune.config import TrainConfig
from preftune.data.collate import collate
from preftune.data.load import load_records
from preftune.data.splits import DataSettings, load_splits
from preftune.data.unpaired import balance_line, weight_suggestion
from preftune.errors import PreftuneError

from .files import write_jsonl
from .test_render import tiny_tokenizer


def test_labelled_rows_standard_and_conversational(tmp_path):
    """true/false and 1/0 labels; message lists as SFT rows read them; the summary counts each label."""
    rows = [{"prompt": "what color", "completion": " blue", "label": True},
            {"prompt": "what color", "completion": " green", "label": 0},
            {"prompt": "hello", "completion": " the sky is blue", "label": 1}]
    data = load_records(write_jsonl(tmp_path / "a.jsonl", rows), kind="unpaired")
    assert [(r["completion"], r["label"]) for r in data.records] == [(" blue", True), (" green", False),
                                                                     (" the sky is blue", True)]
    assert data.summary() == f"loaded 3 examples (unpaired) from {tmp_path / 'a.jsonl'} (2 desirable, 1 undesirable)"
    chat = [{"prompt": [{"role": "user", "content": "what color"}],
             "completion": [{"role": "assistant", "content": "blue"}], "label": False}]
    record = load_records(write_jsonl(tmp_path / "c.jsonl", chat), kind="unpaired").records[0]
    assert record == {"prompt": chat[0]["prompt"], "completion": chat[0]["completion"], "label": False}


@pytest.mark.parametrize(("label", "reason"), [
    ("yes", "field 'label' is 'yes', expected true or false (or 1 or 0)"),
    (2, "field 'label' is 2, expected true or false (or 1 or 0)"),
    (None, "field 'label' is null, expected true or false (or 1 or 0)"),
    ([True], "field 'label' is list, expected true or false (or 1 or 0)"),
])
def test_a_label_that_is_not_a_boolean_is_an_invalid_row(tmp_path, label, reason):
    rows = [{"prompt": "p", "completion": " a", "label": True}, {"prompt": "p", "completion": " b", "label": label},
            {"prompt": "q", "completion": " c"}]
    data = load_records(write_jsonl(tmp_path / "d.jsonl", rows), kind="unpaired", skip_invalid=True)
    assert [r.reason for r in data.invalid] == [reason, "missing field 'label'"]
    with pytest.raises(PreftuneError, match="2 of 3 data rows are invalid"):
        load_records(tmp_path / "d.jsonl", kind="unpaired")


def test_pairs_become_two_examples_each(tmp_path):
    rows = [{"prompt": "what color", "chosen": " blue", "rejected": " green"}]
    data = load_records(write_jsonl(tmp_path / "p.jsonl", rows), kind="unpaired")
    assert data.records == [{"prompt": "what color", "completion": " blue", "label": True},
                            {"prompt": "what color", "completion": " green", "label": False}]
    assert data.summary().endswith("(1 desirable, 1 undesirable); each of the 1 pairs became two examples: its "
                                   "chosen answer desirable, its rejected answer undesirable")


def test_tokenized_examples_keep_their_labels_to_the_batch(tmp_path):
    """Labels are stored beside the token ids (labels.bin), read back per example and collated into the batch;
    the summary adds the paper's balance rule: 3 desirable vs 1 undesirable (ratio 3) → desirable_weight in
    [1/3, 4/9] or undesirable_weight in [2.25, 3]."""
    rows = [{"prompt": "what color", "completion": c, "label": lab} for c, lab in
            ((" blue", True), (" green", False), (" the sky", True), (" sky", True))]
    cfg = TrainConfig(model="m", data=str(write_jsonl(tmp_path / "d.jsonl", rows)), output_dir=str(tmp_path / "o"),
                      loss="kto")
    train, _ = load_splits(DataSettings.of(cfg), tiny_tokenizer(None), "unpaired")
    assert train.pairs.labels.tolist() == [True, False, True, True]
    assert [p.label for p in train.pairs] == [True, False, True, True]
    assert collate([train.pairs[1], train.pairs[0]], [1, 0], 0).desirable.tolist() == [False, True]
    lines = train.summary.split("\n")
    assert lines[0].endswith("(3 desirable, 1 undesirable)")
    assert lines[1] == ("label balance: 3 desirable vs 1 undesirable examples give desirable_weight·n_D / "
                        "(undesirable_weight·n_U) = 3; the KTO paper keeps it in [1, 4/3]: set --desirable-weight in "
                        "[0.333, 0.444] or --undesirable-weight in [2.25, 3] (one of them)")
    assert not any(line.startswith("length bias") for line in lines)


def test_one_label_only_is_refused(tmp_path):
    rows = [{"prompt": "what color", "completion": c, "label": True} for c in (" blue", " green")]
    cfg = TrainConfig(model="m", data=str(write_jsonl(tmp_path / "d.jsonl", rows)), output_dir=str(tmp_path / "o"),
                      loss="kto")
    with pytest.raises(PreftuneError, match=r"^the training data holds only desirable examples; KTO weighs desirable "
                                            r"against undesirable answers, so add undesirable \(label false\) examples, "
                                            r"or train the desirable ones with `preftune sft`$"):
        load_splits(DataSettings.of(cfg), tiny_tokenizer(None), "unpaired")


def test_weight_suggestion_is_the_papers_range():
    """λ_D·n_D / (λ_U·n_U) must lie in [1, 4/3]. 100 desirable, 300 undesirable, λ = 1: ratio 1/3 → desirable_weight
    in [3, 4] or undesirable_weight in [0.25, 1/3]; 120 vs 100 (ratio 1.2) needs nothing."""
    (d_lo, d_hi), (u_lo, u_hi) = weight_suggestion(100, 300)
    assert (d_lo, d_hi, u_lo, u_hi) == pytest.approx((3.0, 4.0, 0.25, 1 / 3))
    assert weight_suggestion(120, 100) is None and balance_line(120, 100) is None
    assert weight_suggestion(100, 300, desirable_weight=3.5) is None
