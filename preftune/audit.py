"""`preftune inspect`: an audit of a preference data set before (or instead of) training on it.

It answers the questions that decide whether a DPO run can work, from the same loader and the same
tokenization as `preftune train`:

* what was loaded and what was dropped (invalid rows by reason), exact and near duplicates, prompts that
  carry many pairs;
* length distributions (tokens with a tokenizer, else whitespace words) and how many pairs ``max_length`` /
  ``max_prompt_length`` would truncate or drop;
* length bias: how often chosen is longer than rejected. DPO rewards whatever separates chosen from rejected,
  and length is the easiest thing to learn (Park et al., 2024, "Disentangling Length from Quality in DPO");
* what the model sees (``show``): examples rendered and tokenized exactly as training does it, with the token
  pieces at the prompt/answer boundary and at the end of each answer (`preftune.data.examples`);
* with a model: how often it already prefers chosen, by summed and per-token log-probability. At the start of
  DPO the policy equals the reference, so these margins ``log pi(y_w|x) - log pi(y_l|x)`` are the model's own
  preference before any training: near 100% means little left to learn, near or below 50% noisy or swapped
  labels (Rafailov et al., 2023).

`audit` returns a JSON-able dict, `format_audit` (preftune.outputs.audit_page) renders it for the terminal, `write_audit` writes the JSON
and a PNG (histograms) or a self-contained HTML page embedding that PNG.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from preftune.command_options import InspectOptions
from preftune.data.encode import BatchEncoder
from preftune.data.examples import examples_from_records, render_record
from preftune.data.gaps import gap_report, gap_warnings
from preftune.data.limits import Limits, effective_limits
from preftune.data.load import LoadedData, load_records
from preftune.data.stats import compact_number as _num
from preftune.data.stats import (
    describe,
    duplicates_warning,
    exact_duplicates,
    histogram,
    length_bias,
    length_bias_warning,
    value_key,
)
from preftune.data.tokenize import DROPPED_EMPTY, IDENTICAL_REASONS, SAME_IDS, TokenizeStats
from preftune.errors import PreftuneError
from preftune.outputs.audit_page import format_audit, share_text, write_audit_files

REPORT_VERSION = 1
TOO_EASY = 0.9
TOO_NOISY = 0.4
MIN_PAIRS_FOR_SHARES = 20  # a share of fewer pairs says nothing about the data (one pair is 0% or 100%)
TRUNCATION_WARN = 0.05  # warn when more than this share of pairs would lose tokens
TOP_PROMPTS = 5
TOP_MARGINS = 10
SNIPPET = 80
PAGE_EXAMPLES = 3  # examples the HTML page shows when --show asks for fewer
CHUNK = 4096  # records rendered and tokenized at a time


def audit(
    source: Any,
    *,
    tokenizer: Any = None,
    model: Any = None,
    max_length: int = 1024,
    max_prompt_length: int = 512,
    batch_size: int = 8,
    show: int = 0,
    context: int | None = None,
    **load_kwargs: Any,
) -> dict:
    """Audit preference data; returns a JSON-able report dict (see `format_audit` for its sections).

    ``context`` is the model's positions (`preftune.modeling.load.context_length`); ``max_length`` is capped to
    it as `train` caps it (`preftune.data.limits.effective_limits`), so truncation is counted as training does
    it. The model's own positions are used when ``model`` is given and ``context`` is not.
    ``source`` is anything `load_records` accepts, or an already loaded `LoadedData`; ``load_kwargs`` go to
    `load_records` (field names, format, split), with ``skip_invalid=True`` so that bad rows are reported,
    not raised. ``tokenizer`` (a transformers tokenizer) gives token lengths measured exactly as training
    tokenizes (answers include the EOS that training appends); without it lengths are whitespace words.
    ``model`` (a causal LM, needs ``tokenizer``) adds the model's preference margins via
    `preftune.scoring.score_records` with the same ``max_length`` / ``max_prompt_length`` truncation.
    ``show`` puts the first ``show`` pairs under ``examples``, rendered and tokenized exactly as training does.
    """
    if max_length < 2 or max_prompt_length < 1 or max_prompt_length >= max_length:
        raise PreftuneError(f"max_prompt_length ({max_prompt_length}) must be at least 1 and below max_length "
                            f"({max_length})")
    if model is not None and tokenizer is None:
        raise PreftuneError("auditing with a model needs its tokenizer too")
    if context is None and model is not None:
        context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    limits = effective_limits(max_length, max_prompt_length, context)
    if isinstance(source, LoadedData):
        data = source
    else:
        load_kwargs.setdefault("skip_invalid", True)
        data = load_records(source, **load_kwargs)
    if data.kind != "preference":
        raise PreftuneError("inspect audits preference data (prompt/chosen/rejected); this data is SFT data")
    records = data.records
    origins = data.origins or [f"record {i + 1}" for i in range(len(records))]

    report: dict[str, Any] = {
        "version": REPORT_VERSION,
        "sources": list(data.sources),
        "format": data.format,
        "conversational": bool(data.conversational),
        "rows_read": sum(data.rows_per_source.values()) or len(records) + len(data.invalid),
        "pairs": len(records),
        "summary": data.summary(),
        "data_warnings": data.warnings(),
        "layout": data.layout,
        "notes": dict(data.notes),
        "limits": {"max_length": limits.max_length, "max_prompt_length": limits.max_prompt_length,
                   "note": limits.note},
    }
    report["invalid"], report["skipped"] = _dropped(data.invalid), _dropped(data.skipped)
    report["examples"] = examples_from_records(records, origins, show, tokenizer=tokenizer,
                                               max_length=limits.max_length, max_prompt_length=limits.max_prompt_length)
    report["duplicates"] = _duplicates(records, origins)
    report["prompts"] = _prompt_counts(records)

    lengths = _lengths(records, tokenizer, limits)
    report["lengths"] = {
        "unit": lengths["unit"],
        "note": lengths["note"],
        **{part: describe(lengths[part]) for part in ("prompt", "chosen", "rejected")},
        "histograms": {part: histogram(lengths[part]) for part in ("prompt", "chosen", "rejected")},
    }
    report["truncation"] = _truncation(lengths, limits)
    report["length_bias"] = length_bias(lengths)
    report["gaps"] = gap_report(records, origins, data.sources)  # the judge's scores of a `preftune pairs` file
    report["model"] = None
    if model is not None:
        report["model"] = _model_margins(
            model, tokenizer, records, origins, limits.max_length, limits.max_prompt_length, batch_size
        )
    report["warnings"] = _warnings(report) + gap_warnings(report["gaps"])
    return report


# ---------------------------------------------------------------------------------------------- sections


def _dropped(rows: Sequence[Any]) -> dict:
    """Invalid or skipped rows (`preftune.data.load.InvalidRow`): how many, by reason, the first ten."""
    return {"count": len(rows), "by_reason": dict(Counter(r.category for r in rows).most_common()),
            "first": [str(r) for r in rows[:10]]}


def _text_of(value: str | list[dict]) -> str:
    if isinstance(value, str):
        return value
    return "\n".join(f"{m['role']}: {m['content']}" for m in value)


def _snippet(value: str | list[dict], width: int = SNIPPET) -> str:
    text = " ".join(_text_of(value).split())
    return text[:width] + ("..." if len(text) > width else "")


def _normalise(value: str | list[dict]) -> str:
    return " ".join(_text_of(value).lower().split())


def _duplicates(records: Sequence[dict], origins: Sequence[str]) -> dict:
    """Exact duplicates: same (prompt, chosen, rejected); counted as copies beyond the first.

    Near duplicates: equal after lower-casing and collapsing whitespace but not exact duplicates; counted the
    same way (copies beyond the first of a normalised group, minus the exact copies already counted).
    Near-identical pairs: chosen and rejected equal after that normalisation (no preference signal).
    """
    copies = exact_duplicates(records)
    norm_seen: set[tuple[str, str, str]] = set()
    norm_copies = 0
    identical = 0
    identical_examples: list[str] = []
    for i, rec in enumerate(records):
        nkey = (_normalise(rec["prompt"]), _normalise(rec["chosen"]), _normalise(rec["rejected"]))
        if nkey in norm_seen:
            norm_copies += 1
        else:
            norm_seen.add(nkey)
        if nkey[1] == nkey[2]:
            identical += 1
            if len(identical_examples) < 5:
                identical_examples.append(origins[i])
    return {
        "exact": len(copies),
        "exact_examples": [f"{origins[i]} repeats {origins[j]}" for i, j in copies[:5]],
        "near": norm_copies - len(copies),
        "near_identical_pairs": identical,
        "near_identical_examples": identical_examples,
    }


def _prompt_counts(records: Sequence[dict]) -> dict:
    counts = Counter(value_key(r["prompt"]) for r in records)
    first: dict[str, str | list[dict]] = {}
    for r in records:
        first.setdefault(value_key(r["prompt"]), r["prompt"])
    top = [{"prompt": _snippet(first[k]), "pairs": n} for k, n in counts.most_common(TOP_PROMPTS)]
    return {
        "distinct": len(counts),
        "mean_pairs_per_prompt": round(len(records) / len(counts), 3) if counts else 0.0,
        "top": top,
    }


def _lengths(records: Sequence[dict], tokenizer: Any, limits: Limits) -> dict:
    """Per-pair lengths [prompt], [chosen], [rejected] before truncation, and what training's tokenization (the
    same `BatchEncoder`, at the run's limits) truncates and drops (`stats`); without a tokenizer, whitespace words."""
    if tokenizer is None:
        words = [[len(_text_of(r[k]).split()) for r in records] for k in ("prompt", "chosen", "rejected")]
        return {"unit": "words", "note": "whitespace words, not tokens (pass a model/tokenizer for token counts)",
                "prompt": words[0], "chosen": words[1], "rejected": words[2],
                "empty": [i for i in range(len(records)) if words[1][i] == 0 or words[2][i] == 0]}
    encoder = BatchEncoder(tokenizer, max_length=limits.max_length, max_prompt_length=limits.max_prompt_length)
    stats, full, flags = TokenizeStats(), [], []
    for s in range(0, len(records), CHUNK):
        enc = encoder([render_record(tokenizer, r) for r in records[s:s + CHUNK]])
        stats.add(enc, s)
        full.append(enc.full)
        flags.append(enc.flags)
    shown = np.concatenate(flags) & (DROPPED_EMPTY | SAME_IDS) == 0 if flags else np.zeros(0, dtype=bool)
    lengths = np.concatenate(full)[shown] if full else np.zeros((0, 3), dtype=np.int64)
    return {
        "unit": "tokens",
        "note": "tokens as training tokenizes them; each answer ends in one EOS, as in training",
        "prompt": lengths[:, 0].tolist(),
        "chosen": lengths[:, 1].tolist(),
        "rejected": lengths[:, 2].tolist(),
        "empty": list(stats.dropped_empty),
        "stats": stats,
    }


def _truncation(lengths: dict, limits: Limits) -> dict:
    """Pairs that training's truncation touches, counted per pair (a pair counts once per kind): with tokens,
    exactly training's counts; with words, prompt truncated = prompt > max_prompt_length, completion truncated =
    the longer answer does not fit in max_length - min(prompt, max_prompt_length). dropped: an answer would be
    empty (no token of its own), or chosen and rejected identical (tokens only, by cause)."""
    ml, mpl = limits.max_length, limits.max_prompt_length
    cut = lengths.get("stats")
    if cut is None:
        cut = TokenizeStats()
        for p, c, r in zip(lengths["prompt"], lengths["chosen"], lengths["rejected"]):
            cut.prompt_truncated += p > mpl
            cut.completion_truncated += max(c, r) > ml - min(p, mpl)
    return {
        "unit": lengths["unit"],
        "max_length": ml,
        "max_prompt_length": mpl,
        "prompt_truncated": cut.prompt_truncated,
        "completion_truncated": cut.completion_truncated,
        "dropped_empty": len(lengths["empty"]),
        "dropped_identical": len(cut.dropped_identical),
        "identical_causes": {k: v for k, v in cut.identical_causes().items() if v},
    }


def _model_margins(
    model: Any,
    tokenizer: Any,
    records: Sequence[dict],
    origins: Sequence[str],
    max_length: int,
    max_prompt_length: int,
    batch_size: int,
) -> dict:
    """Margins m = log pi(chosen|x) - log pi(rejected|x) (summed) and the per-token version
    log pi(chosen|x)/|chosen| - log pi(rejected|x)/|rejected|, over the pairs training would keep."""
    from preftune.scoring import score_records  # imports torch: only when a model is audited

    out = score_records(
        model,
        tokenizer,
        records,
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        batch_size=batch_size,
    )
    cl, rl = out["chosen_logps"].tolist(), out["rejected_logps"].tolist()
    cn, rn = out["chosen_lengths"].tolist(), out["rejected_lengths"].tolist()
    kept = list(out["kept"])
    n = len(kept)
    if not n:
        return {"scored": 0}
    margin = [a - b for a, b in zip(cl, rl)]
    per_token = [a / max(x, 1) - b / max(y, 1) for a, b, x, y in zip(cl, rl, cn, rn)]
    quantiles = (("p5", 0.05), ("p25", 0.25), ("median", 0.5), ("p75", 0.75), ("p95", 0.95))
    order = sorted(range(n), key=lambda j: -abs(margin[j]))[:TOP_MARGINS]
    largest = []
    for j in order:
        rec = records[kept[j]]
        largest.append(
            {
                "where": origins[kept[j]],
                "margin": _num(margin[j]),
                "margin_per_token": _num(per_token[j]),
                "verdict": "prefers chosen" if margin[j] > 0 else "prefers rejected",
                "prompt": _snippet(rec["prompt"]),
                "chosen": _snippet(rec["chosen"]),
                "rejected": _snippet(rec["rejected"]),
            }
        )
    return {
        "scored": n,
        "prefers_chosen": _num(sum(m > 0 for m in margin) / n),
        "prefers_chosen_per_token": _num(sum(m > 0 for m in per_token) / n),
        "margin": describe(margin, quantiles),
        "margin_per_token": describe(per_token, quantiles),
        "histogram": histogram(margin),
        "largest": largest,
    }


def _warnings(report: dict) -> list[str]:
    out: list[str] = []
    n = report["pairs"]
    inv = report["invalid"]["count"]
    if inv:
        out.append(f"{inv:,} invalid rows were dropped; training refuses them unless --skip-invalid is given")
    dup = report["duplicates"]
    if dup["exact"]:
        out.append(duplicates_warning(dup["exact"]))
    if dup["near_identical_pairs"]:
        out.append(
            f"{dup['near_identical_pairs']:,} pairs whose chosen and rejected differ only in case/whitespace "
            "carry almost no preference signal"
        )
    top = report["prompts"]["top"]
    if top and n >= 20 and top[0]["pairs"] > 0.1 * n:
        out.append(f"one prompt carries {share_text(top[0]['pairs'], n)} of the pairs")
    warning = length_bias_warning(report["length_bias"])
    if warning:
        out.append(warning)
    tr = report["truncation"]
    unit = tr["unit"]
    for key, what, flag in (
        ("prompt_truncated", "prompts", "--max-prompt-length"),
        ("completion_truncated", "answers", "--max-length"),
    ):
        if n and tr[key] > TRUNCATION_WARN * n:
            out.append(
                f"{share_text(tr[key], n)} pairs would have their {what} truncated ({unit}); "
                f"consider raising {flag}"
            )
    if tr["dropped_empty"]:
        out.append(f"{tr['dropped_empty']:,} pairs would be dropped: an answer adds no token of its own")
    for cause, count in tr.get("identical_causes", {}).items():
        out.append(f"{count:,} pairs would be dropped: {IDENTICAL_REASONS[cause]}")
    sk = report.get("skipped", {})
    if sk.get("count"):
        reasons = ", ".join(f"{n:,} {why}" for why, n in sk["by_reason"].items())
        out.append(f"{sk['count']:,} pairs hold nothing to train on and are dropped ({reasons}; first: {sk['first'][0]})")
    out += report.get("data_warnings", [])
    m = report.get("model")
    if m and m.get("scored", 0) >= MIN_PAIRS_FOR_SHARES:
        share = m["prefers_chosen"]
        if share > TOO_EASY:
            out.append(
                f"the model already prefers chosen in {100 * share:.1f}% of pairs: the data may be too easy "
                "to teach it much"
            )
        elif share < TOO_NOISY:
            out.append(
                f"the model prefers chosen in only {100 * share:.1f}% of pairs: the labels may be noisy or "
                "swapped (check the largest negative margins)"
            )
    return out


# ---------------------------------------------------------------------------------------------- rendering


def write_audit(report: dict, output_json: str | Path,
                output_html_or_png: str | Path | Sequence[str | Path] | None = None) -> None:
    """Write the report as JSON and, optionally, its histograms as a PNG and/or a self-contained HTML page
    (each extra path's suffix picks which: .png or .html/.htm; pass a list for both)."""
    write_audit_files(report, format_audit(report), output_json, output_html_or_png)


def run_inspect(opts: InspectOptions) -> int:
    """`preftune inspect DATA... [--model M | --tokenizer T] [--show N] [--output report.json]`: print the
    audit and, with --output, write report.json plus report.png and report.html beside it. Returns the exit
    status (0). `opts` are checked when built (a negative --show, --model with --tokenizer are refused there).
    """
    data = list(opts.data) if isinstance(opts.data, (list, tuple)) else opts.data
    if isinstance(data, list) and len(data) == 1:
        data = data[0]  # one argument may be a glob or a folder
    output, show = opts.output, opts.show
    if output and Path(output).suffix.lower() in (".png", ".html", ".htm"):
        raise PreftuneError(
            f"--output takes the JSON file name ({output} given); the PNG and HTML go beside it"
        )
    model = tokenizer = context = None
    if opts.model or opts.tokenizer:
        # torch and transformers load in seconds: only when a model or tokenizer is asked for
        import torch

        from preftune.modeling.load import context_length, load_model_and_tokenizer, load_tokenizer

        context = context_length(opts.model or opts.tokenizer)  # train caps max_length to it: so does inspect
    if opts.model:
        model, tokenizer = load_model_and_tokenizer(opts.model)
        if torch.cuda.is_available():
            model = model.to("cuda")
        model.eval()
    elif opts.tokenizer:
        tokenizer = load_tokenizer(opts.tokenizer)
    report = audit(
        data,
        tokenizer=tokenizer,
        model=model,
        max_length=opts.max_length,
        max_prompt_length=opts.max_prompt_length,
        batch_size=opts.batch_size,
        show=max(show, PAGE_EXAMPLES) if output else show,
        context=context,
        split=opts.split,
        ranked=opts.ranked,
        format=opts.format,
        prompt_field=opts.prompt_field,
        chosen_field=opts.chosen_field,
        rejected_field=opts.rejected_field,
        prompt_template=opts.prompt_template,
    )
    report["show"] = show  # the terminal prints --show of them; the page shows a few more
    print(format_audit(report))
    if output:
        out = Path(output)
        if not out.suffix:
            out = out.with_suffix(".json")
        extras = [out.with_suffix(".png"), out.with_suffix(".html")]
        write_audit(report, out, extras)
        print(f"wrote {out}, {extras[0]} and {extras[1]}")
    return 0
