"""Training data as the recipe needs it: load, validate, hold out, render, tokenize, summarise.

`load_splits` is the one road from a config's data settings to tokenized train/eval splits, so `train`,
`sft` and every test see the same rows, the same truncation and the same summary lines.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from preftune.data.examples import example, format_example, render_record
from preftune.data.tokenize import TokenizedPair, tokenize_records
from preftune.errors import PreftuneError

if TYPE_CHECKING:  # the data layer sits below the config; it only reads the data settings
    from preftune.config import TrainConfig


@dataclass
class Split:
    pairs: list[TokenizedPair]
    summary: str
    # the first pair as training sees it (`preftune.data.examples.example`), shown in the summary
    example: dict | None = None


SUMMARY_TEXT_LIMIT = 600  # characters of each text the summary's example shows before eliding the middle


def load_splits(cfg: TrainConfig, tokenizer, task: str) -> tuple[Split, Split | None]:
    """Tokenized (train, eval or None) splits of `cfg`'s data; the train split's summary holds the lines the
    recipe prints: what was loaded and dropped, held out, tokenized (truncated, dropped), length bias, exact
    duplicates, and one example exactly as training sees it."""
    from preftune.data.load import load_records, split_records
    from preftune.data.stats import duplicates_warning, exact_duplicates

    kind = "sft" if task == "sft" else "preference"
    kw = dict(kind=kind, format=cfg.format, prompt_field=cfg.prompt_field, chosen_field=cfg.chosen_field,
              rejected_field=cfg.rejected_field, completion_field=cfg.completion_field,
              prompt_template=cfg.prompt_template, skip_invalid=cfg.skip_invalid)
    loaded = load_records(cfg.data, **kw)
    train_records, eval_records = loaded.records, None
    lines = [loaded.summary()]
    if cfg.eval_data:
        held = load_records(cfg.eval_data, **kw)
        eval_records = held.records
        lines.append("eval: " + held.summary())
    elif cfg.eval_fraction > 0:
        train_records, eval_records = split_records(train_records, cfg.eval_fraction, cfg.seed)
        lines.append(f"held out {len(eval_records):,} of {len(loaded.records):,} for evaluation "
                     f"(eval_fraction {cfg.eval_fraction})")

    def tok(records, name):
        texts = [render_record(tokenizer, r) for r in records]
        pairs, stats = tokenize_records(tokenizer, texts, max_length=cfg.max_length,
                                        max_prompt_length=cfg.max_prompt_length)
        if not pairs:
            raise PreftuneError(f"no {name} example is left after tokenization ({stats.summary()}); check the data "
                                "and max_length / max_prompt_length.")
        return pairs, texts, f"{name} {stats.summary()}"

    train_pairs, train_texts, s = tok(train_records, "train")
    lines.append(s)
    if task == "dpo":
        lines.append(_length_bias_line(train_pairs))
    dup = duplicates_warning(len(exact_duplicates(train_records)), "pairs" if task == "dpo" else "examples")
    if dup:
        lines.append(dup)
    eval_split = None
    if eval_records:
        eval_pairs, _, s = tok(eval_records, "eval")
        lines.append(s)
        eval_split = Split(eval_pairs, s)
    first = train_pairs[0]
    origin = dict(zip(map(id, loaded.records), loaded.origins)).get(id(train_records[first.index]), "")
    shown = example(tokenizer, train_records[first.index], train_texts[first.index], first, origin)
    lines += format_example(shown, "first training example as the model sees it", SUMMARY_TEXT_LIMIT)
    return Split(train_pairs, "\n".join(lines), shown), eval_split


def _length_bias_line(pairs: list[TokenizedPair]) -> str:
    """DPO learns "longer is better" from data where chosen is usually the longer answer: say so up front."""
    from preftune.data.stats import length_bias, length_bias_warning

    b = length_bias({"chosen": [len(p.chosen_ids) for p in pairs], "rejected": [len(p.rejected_ids) for p in pairs],
                     "unit": "tokens"})
    return length_bias_warning(b) or (f"length bias: chosen is longer in {b['chosen_longer']:.0%} and shorter in "
                                      f"{b['chosen_shorter']:.0%} of pairs (mean difference "
                                      f"{b['mean_difference']:+.1f} tokens)")
