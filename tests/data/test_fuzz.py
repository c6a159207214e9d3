"""Property: whatever bytes a data file holds, load_records returns or raises PreftuneError, nothing else."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from preftune.data.load import LoadedData, load_records
from preftune.errors import PreftuneError

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from(["prompt", "chosen", "rejected", "completion", "role", "content", "x"]),
            inner,
            max_size=4,
        )
    ),
    max_leaves=10,
)
messages = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]), "content": st.text(max_size=6)}),
    max_size=3,
)
rows = st.fixed_dictionaries(
    {},
    optional={
        "prompt": st.text(max_size=8) | messages,
        "chosen": st.text(max_size=8) | messages,
        "rejected": st.text(max_size=8) | messages,
        "completion": st.text(max_size=8) | json_values,
    },
)
# a line is a plausible row, any JSON value, a mangled row, or raw bytes (including invalid UTF-8)
lines = st.one_of(
    rows.map(lambda r: json.dumps(r).encode()),
    json_values.map(lambda v: json.dumps(v).encode()),
    rows.map(lambda r: json.dumps(r).encode()[:-2]),
    st.binary(max_size=20),
    st.sampled_from(
        [b"", b"[", b"{", b'"', b",,,", b"prompt,chosen,rejected", b'"a\nb",c', b"\xef\xbb\xbf", b"PAR1"]
    ),
)
files = st.lists(lines, max_size=8).map(lambda ls: b"\n".join(ls))


def _load(data: bytes, suffix: str, **kwargs) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"data{suffix}"
        path.write_bytes(data)
        try:
            out = load_records(path, **kwargs)
        except PreftuneError as e:
            assert str(e)  # a message a user can read, never an empty one
            return
        assert isinstance(out, LoadedData) and out.records


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=files,
    suffix=st.sampled_from([".jsonl", ".json", ".csv", ".tsv", ".txt"]),
    skip=st.booleans(),
    kind=st.sampled_from(["preference", "sft"]),
)
def test_malformed_files_only_raise_preftune_error(data, suffix, skip, kind):
    _load(data, suffix, skip_invalid=skip, kind=kind)


@settings(max_examples=50, deadline=None)
@given(data=st.binary(max_size=200), suffix=st.sampled_from([".jsonl", ".csv", ".parquet", ".json"]))
def test_random_bytes_only_raise_preftune_error(data, suffix):
    _load(data, suffix)


# Keys of the layouts preftune recognises (ShareGPT, OpenAI, Alpaca, Orca, content parts), with any values.
LAYOUT_KEYS = ["conversations", "messages", "from", "value", "instruction", "input", "output", "history", "system",
               "question", "preferred_output", "non_preferred_output", "type", "text", "chosen", "rejected", "role",
               "content", "prompt"]
layout_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(LAYOUT_KEYS), inner, max_size=4),
    max_leaves=12,
)
layout_rows = st.dictionaries(st.sampled_from(LAYOUT_KEYS), layout_values, max_size=6)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.lists(layout_rows, min_size=1, max_size=6),
    kind=st.sampled_from(["preference", "sft"]),
    template=st.sampled_from([None, "{system}\n\n{question}", "{instruction} {input}"]),
)
def test_layout_shaped_rows_only_raise_preftune_error(rows, kind, template):
    data = b"\n".join(json.dumps(r).encode() for r in rows)
    _load(data, ".jsonl", skip_invalid=True, kind=kind, prompt_template=template)
