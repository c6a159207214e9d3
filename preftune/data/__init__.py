"""Data: load and validate (load.py), render chat templates (formats.py), tokenize and collate."""

from __future__ import annotations

from preftune.data.load import InvalidRow, LoadedData, load_records, split_records

__all__ = ["InvalidRow", "LoadedData", "load_records", "split_records"]
