"""Training data as the recipe needs it: load, validate, hold out, render, tokenize, summarise, cache.

`load_splits` is the one road from a config's data settings to tokenized train/eval splits, so `train`,
`sft` and every test see the same rows, the same truncation and the same summary lines.

The data streams through validation and batched tokenization into memory-mapped arrays (`preftune.data.build`,
`preftune.data.store`); a split is a `Pairs` view of them, never a list of Python objects per pair. The result,
summary included, is cached on disk under a key of everything that shapes it (`preftune.data.cache`), so a
rerun or a resume opens it in a moment. A cache entry holds:

    meta.json                 the key's ingredients, the stores' sizes and digests, the summary lines, the example
    data/                     the training data's store (ids.bin, lengths.bin, index.bin)
    eval/                     the eval_data store, when eval_data is given
    train.bin, eval.bin       int64 positions into a store of each split's pairs (train and held-out eval)
"""

from __future__ import annotations

import json
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from preftune.data.build import build_source, find_record
from preftune.data.cache import (
    DataEntry,
    building,
    commit,
    find,
    library_versions,
    make_key,
    prepare_dir,
    source_fingerprint,
    staging_folder,
    tokenizer_fingerprint,
)
from preftune.data.encode import BatchEncoder
from preftune.data.examples import example, format_example, render_record
from preftune.data.holdout import HoldOut
from preftune.data.stats import duplicates_warning, length_bias, length_bias_warning
from preftune.data.store import Pairs, PairStore
from preftune.data.tokenize import (
    ANSWERS_TRUNCATED,
    DROPPED_EMPTY,
    DROPPED_IDENTICAL,
    PROMPT_TRUNCATED,
    SAME_IDS,
    UNKNOWN,
    TokenizeStats,
)
from preftune.data.unpaired import balance_line, check_both_labels
from preftune.errors import PreftuneError


@dataclass(frozen=True)
class DataSettings:
    """What the tokenized splits are made from: the TrainConfig options of the same names (`DataSettings.of(cfg)`),
    and nothing else of the run (the data layer sits below the config)."""

    data: Any
    eval_data: Any
    eval_split: str | None
    eval_fraction: float
    seed: int  # the hold-out's (with eval_fraction)
    split: str | None
    ranked: str
    format: str
    prompt_field: str
    chosen_field: str
    rejected_field: str
    completion_field: str
    prompt_template: str | None
    skip_invalid: bool
    max_length: int
    max_prompt_length: int
    data_cache_dir: str | None
    progress: bool
    # unpaired data (KTO): the label balance line weighs the counts as the loss will (preftune.data.unpaired)
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0

    @classmethod
    def of(cls, cfg: Any) -> DataSettings:
        """The data settings of a TrainConfig (or of anything with these attributes; the KTO weights may be
        missing)."""
        return cls(**{f.name: getattr(cfg, f.name) if f.default is MISSING else getattr(cfg, f.name, f.default)
                      for f in fields(cls)})

    @property
    def holdout(self) -> HoldOut:
        return HoldOut(self.data, self.eval_data, self.eval_split, self.eval_fraction, self.seed)

    def read_kwargs(self, task: str) -> dict[str, Any]:
        """`RecordStream`'s keywords for `task`'s data (train, sft or unpaired)."""
        return dict(kind=_kind(task), format=self.format, prompt_field=self.prompt_field,
                    chosen_field=self.chosen_field, rejected_field=self.rejected_field,
                    completion_field=self.completion_field, prompt_template=self.prompt_template,
                    skip_invalid=self.skip_invalid, split=self.split, ranked=self.ranked)


@dataclass
class Split:
    pairs: Pairs  # a Sequence[TokenizedPair] backed by the cache entry's arrays
    summary: str
    # the first pair as training sees it (`preftune.data.examples.example`), shown in the summary
    example: dict | None = None
    info: dict = field(default_factory=dict)  # files, rows per file, records, pairs, cache key (TrainState.data_info)
    entry: DataEntry | None = None  # the cache entry the pairs live in (`keep_data_in` moves a staged one)


SUMMARY_TEXT_LIMIT = 600  # characters of each text the summary's example shows before eliding the middle


def load_splits(settings: DataSettings, tokenizer, task: str, *, cache_dir: Path | None = None,
                progress: bool | None = None) -> tuple[Split, Split | None]:
    """Tokenized (train, eval or None) splits of the data `settings` name; the train split's summary holds the lines the
    recipe prints: what was loaded and dropped, held out, tokenized (truncated, dropped), length bias, exact
    duplicates, and one example exactly as training sees it.

    The result is cached under `settings.data_cache_dir` when set, else under `cache_dir` (the run folder's
    `data_cache/`): reused when present; built there when that folder exists; otherwise built in the temporary
    folder, and `keep_data_in` moves it to `cache_dir` once that may be written. Without either, nothing is kept.
    """
    shared = settings.data_cache_dir
    where = Path(shared).expanduser() if shared else cache_dir
    if shared:
        prepare_dir(where)
    ingredients = data_ingredients(settings, tokenizer, task)
    key = make_key(ingredients)
    found = find(where, key)
    if found is not None:
        return open_entry(DataEntry(found, key, staged=False))
    staging, staged = staging_folder(where, key)
    with building(staging):  # removed if anything stops it; a full disk is one sentence
        build_entry(settings, tokenizer, task, staging, ingredients, settings.progress if progress is None else progress)
    if staged:
        return open_entry(DataEntry(staging, key, staged=True))
    return open_entry(DataEntry(commit(staging, where, key), key, staged=False))


def keep_data_in(split: Split, cache_dir: Path) -> None:
    """Move a split's staged cache entry into `cache_dir` (a fresh run, once its folder exists)."""
    if split.entry is not None:
        split.entry.keep_in(cache_dir)


def data_ingredients(settings: DataSettings, tokenizer, task: str) -> dict:
    """Everything the tokenized splits depend on (the cache key is its hash)."""
    return {"task": _kind(task), "data": source_fingerprint(settings.data),
            **settings.holdout.ingredients(source_fingerprint), **settings.read_kwargs(task),
            "max_length": settings.max_length, "max_prompt_length": settings.max_prompt_length,
            "tokenizer": tokenizer_fingerprint(tokenizer), **library_versions()}


def _kind(task: str) -> str:
    """The data a task reads: "sft" examples, "unpaired" ones (KTO; `preftune.data.unpaired`), else pairs."""
    return task if task in ("sft", "unpaired") else "preference"


def build_entry(settings: DataSettings, tokenizer, task: str, folder: Path, ingredients: dict,
                progress: bool) -> None:
    """Stream, tokenize and split the data into a cache entry in `folder` (meta.json written last)."""

    kw = settings.read_kwargs(task)
    encoder = BatchEncoder(tokenizer, max_length=settings.max_length, max_prompt_length=settings.max_prompt_length)
    holdout = settings.holdout
    data = build_source(settings.data, folder / "data", tokenizer=tokenizer, encoder=encoder, load_kwargs=kw,
                        rank_seed=holdout.rank_seed, progress=progress)
    held = None
    if holdout.source is not None:  # another source, or another split of the same one
        held = build_source(holdout.source, folder / "eval", tokenizer=tokenizer, encoder=encoder,
                            load_kwargs={**kw, "split": holdout.eval_split}, progress=progress, desc="tokenizing eval")
    n = len(data.position)
    lines = [data.loaded.summary(), *data.loaded.warnings()]
    if task == "unpaired":
        check_both_labels(data.loaded.notes, "the training data")
        balance = balance_line(data.loaded.notes["desirable"], data.loaded.notes["undesirable"],
                               settings.desirable_weight, settings.undesirable_weight)
        lines += [balance] if balance else []
    in_eval = np.zeros(n, dtype=bool)
    if held is not None:
        lines.append("eval: " + held.loaded.summary())
    elif holdout.fraction:
        in_eval, line = holdout.split(data.rank)
        lines.append(line)
    train = _split_of(data, ~in_eval, "train")
    lines.append(train["line"])
    store = PairStore(folder / "data", data.store)
    if task == "dpo":
        chosen, rejected = store.lengths[train["positions"], 1], store.lengths[train["positions"], 2]
        lines.append(_length_bias_line(chosen.tolist(), rejected.tolist()))
    dup_keys = data.duplicate_key[~in_eval]
    dup = duplicates_warning(len(dup_keys) - len(np.unique(dup_keys)), "pairs" if task == "dpo" else "examples")
    if dup:
        lines.append(dup)
    evaluation = None
    if held is not None:
        evaluation = _split_of(held, np.ones(len(held.position), dtype=bool), "eval", store="eval")
    elif in_eval.any():
        evaluation = _split_of(data, in_eval, "eval")
    if evaluation is not None:
        lines.append(evaluation["line"])
    shown = _first_example(settings.data, kw, tokenizer, data, store, int(train["positions"][0]))
    lines += format_example(shown, "first training example as the model sees it", SUMMARY_TEXT_LIMIT)
    splits = {}
    for name, split in (("train", train), ("eval", evaluation)):
        if split is not None:
            split["positions"].astype(np.int64).tofile(folder / f"{name}.bin")
            splits[name] = {"store": split["store"], "summary": split["line"]}
    info = {"files": data.loaded.sources, "rows": data.loaded.rows_per_source, "records": n,
            "pairs": int(len(train["positions"]))}
    meta = {"ingredients": ingredients, "stores": {"data": data.store, **({"eval": held.store} if held else {})},
            "splits": splits, "summary": "\n".join(lines), "example": shown, "info": info}
    (folder / "meta.json").write_text(json.dumps(meta, ensure_ascii=False, default=str), encoding="utf-8")


def _split_of(built: Any, records: np.ndarray, name: str, store: str = "data") -> dict:
    """The pairs of the records selected by the mask `records`, and their "<name> tokenized: ..." line."""
    flags, position = built.flags[records], built.position[records]
    index = np.flatnonzero(records)
    stats = TokenizeStats(kept=int((position >= 0).sum()),
                          dropped_empty=index[(flags & DROPPED_EMPTY) > 0].tolist(),
                          dropped_identical=index[(flags & DROPPED_IDENTICAL) > 0].tolist(),
                          same_ids=index[(flags & SAME_IDS) > 0].tolist(), unknown=index[(flags & UNKNOWN) > 0].tolist(),
                          prompt_truncated=int(np.count_nonzero(flags & PROMPT_TRUNCATED)),
                          completion_truncated=int(np.count_nonzero(flags & ANSWERS_TRUNCATED)),
                          eos_in_text=int(built.eos[records].sum()))
    if not stats.kept:
        raise PreftuneError(f"no {name} example is left after tokenization ({stats.summary()}); check the data "
                            "and max_length / max_prompt_length.")
    return {"positions": position[position >= 0], "line": f"{name} {stats.summary()}", "store": store}


def _first_example(source: Any, load_kwargs: dict, tokenizer, data: Any, store: PairStore, position: int) -> dict:
    """The first training pair as the model sees it, from its record (kept while streaming, else read again from
    `source` with `load_kwargs`)."""
    pair = store.pairs()[position]
    if pair.index in data.samples:
        record, texts, origin = data.samples[pair.index]
    else:
        record, origin = find_record(source, load_kwargs, pair.index)
        texts = render_record(tokenizer, record)
    return example(tokenizer, record, texts, pair, origin)


def open_entry(entry: DataEntry) -> tuple[Split, Split | None]:
    """The splits of a complete cache entry, memory-mapped."""
    meta = json.loads((entry.path / "meta.json").read_text(encoding="utf-8"))
    stores = {name: PairStore(entry.path / name, store) for name, store in meta["stores"].items()}
    info = {**meta["info"], "cache_key": entry.key}
    out: dict[str, Split] = {}
    for name, split in meta["splits"].items():
        positions = np.fromfile(entry.path / f"{name}.bin", dtype=np.int64)
        pairs = stores[split["store"]].pairs(positions)
        if name == "train":
            out[name] = Split(pairs, meta["summary"], meta["example"], info, entry)
        else:
            out[name] = Split(pairs, split["summary"], None, {}, entry)
    return out["train"], out.get("eval")


def _length_bias_line(chosen: list[int], rejected: list[int]) -> str:
    """DPO learns "longer is better" from data where chosen is usually the longer answer: say so up front."""
    b = length_bias({"chosen": chosen, "rejected": rejected, "unit": "tokens"})
    return length_bias_warning(b) or (f"length bias: chosen is longer in {b['chosen_longer']:.0%} and shorter in "
                                      f"{b['chosen_shorter']:.0%} of pairs (mean difference "
                                      f"{b['mean_difference']:+.1f} tokens)")
