"""Data: read sources (sources.py), find the layout (layouts.py), validate rows (validate.py, implicit.py) behind
`load_records` (load.py); render chat templates (render.py), tokenize (tokenize.py), show examples (examples.py),
statistics (stats.py), the train/eval splits (splits.py), batch order (sampler.py) and collation (collate.py)."""

from __future__ import annotations

from preftune.data.load import InvalidRow, LoadedData, load_records, split_records

__all__ = ["InvalidRow", "LoadedData", "load_records", "split_records"]
