"""load_splits (preftune.data.splits): the data summary `train` prints, from a config."""

from __future__ import annotations

from preftune.config import TrainConfig
from preftune.data.splits import DataSettings, load_splits

from .files import write_jsonl
from .test_render import tiny_tokenizer


def test_summary_warns_about_duplicates_drops_identical_answers_and_shows_an_example(tmp_path):
    """Word tokens, max_length 4, max_prompt_length 2:
    lines 1-2 (identical): prompt "what color" (2), answers blue+EOS / green+EOS (2 each) fit: kept, and line 2
    is an exact duplicate of line 1;
    line 3: prompt "hello" (1) leaves room for 3 answer tokens: "the sky is blue"+EOS and "the sky is green"+EOS
    both become "the sky is": identical, dropped and counted.
    Kept pairs have equal lengths: chosen longer in 0%, shorter in 0%, mean difference +0.0."""
    a = {"prompt": "what color", "chosen": " blue", "rejected": " green"}
    c = {"prompt": "hello", "chosen": " the sky is blue", "rejected": " the sky is green"}
    path = write_jsonl(tmp_path / "d.jsonl", [a, a, c])
    cfg = TrainConfig(model="m", data=str(path), output_dir=str(tmp_path / "out"), max_length=4,
                      max_prompt_length=2)
    train, held = load_splits(DataSettings.of(cfg), tiny_tokenizer(None), "dpo")
    assert held is None and [p.index for p in train.pairs] == [0, 1]
    assert train.summary.split("\n") == [
        f"loaded 3 pairs (standard) from {path}",
        "train tokenized: 2 kept, 1 answers truncated (right), 1 dropped (chosen and rejected identical after "
        "truncation: no signal)",
        "length bias: chosen is longer in 0% and shorter in 0% of pairs (mean difference +0.0 tokens)",
        "1 exact duplicate pairs: they weigh those examples double; deduplicate them",
        f"first training example as the model sees it ({path} line 1):",
        "  prompt   'what color'",
        "  chosen   ' blue'",
        "  rejected ' green'",
        "  tokens   prompt 2, chosen 2 (EOS added), rejected 2 (EOS added)",
        "  chosen start    'what' 'color' | 'blue' '</s>'",
        "  rejected start  'what' 'color' | 'green' '</s>'",
        "  chosen end      'blue' '</s>'",
        "  rejected end    'green' '</s>'",
    ]
    assert train.example["tokens"]["chosen_start"] == ["blue", "</s>"]


def test_sft_summary_and_prompt_template(tmp_path):
    """SFT from Orca-style rows with --prompt-template: the prompt is "what color", the completion " blue"."""
    rows = [{"system": "what", "question": "color", "chosen": " blue", "rejected": " green"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = TrainConfig(model="m", data=str(path), output_dir=str(tmp_path / "out"), prompt_template="{system} {question}")
    train, _ = load_splits(DataSettings.of(cfg), tiny_tokenizer(None), "sft")
    assert train.summary.split("\n")[0] == f"loaded 1 example (preference-chosen) from {path}"
    assert train.summary.split("\n")[-6:] == [
        f"first training example as the model sees it ({path} line 1):",
        "  prompt     'what color'",
        "  completion ' blue'",
        "  tokens     prompt 2, completion 2 (EOS added)",
        "  completion start  'what' 'color' | 'blue' '</s>'",
        "  completion end    'blue' '</s>'",
    ]
