"""Data: read sources (sources.py picks a reader in readers.py / json_arrays.py; rows.py holds what they share and
the bounds), find the layout (detect.py; layouts.py, converters.py and ranked.py read them; fields.py paths and
templates), validate rows (validate.py, messages.py, implicit.py) behind `load_records` (load.py); render chat
templates (render.py, bounded by chat_template.py), tokenize (tokenize.py the per-pair rule, encode.py batched),
the limits train and inspect share (limits.py), show examples (examples.py), statistics (stats.py), the train/eval
splits (splits.py, build.py, store.py, cache.py; which records evaluate: holdout.py), prompts for generate
(prompts.py), batch order and each process's share (batching.py) and collation (collate.py)."""

from __future__ import annotations

from preftune.data.load import InvalidRow, LoadedData, load_records

__all__ = ["InvalidRow", "LoadedData", "load_records"]
