"""`preftune inspect` on unpaired data (KTO's ``{"prompt", "completion", "label"}`` rows): what `--loss kto` would
train on, read with the same loader and tokenization.

It counts desirable and undesirable examples and says when their balance is outside the KTO paper's rule (with
the weights that would fix it), lists invalid rows, exact duplicates (and the same prompt and answer labelled
both ways), the prompt and completion lengths of each label (tokens with a tokenizer, else words) and how many
examples `max_length` would cut, and shows the first examples as training sees them. With --output it writes
the JSON report, its length histograms as a PNG and the HTML page (outputs/audit_page.py), as inspect does for
pairs.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from preftune import audit
from preftune.data.encode import tokenize_records
from preftune.data.examples import examples_from_records, format_example, render_record
from preftune.data.limits import Limits, effective_limits
from preftune.data.load import LoadedData, load_records
from preftune.data.rows import CHUNK_ROWS, Bad
from preftune.data.sources import iter_rows, resolve
from preftune.data.stats import describe, histogram, value_key
from preftune.data.unpaired import LABEL, weight_suggestion
from preftune.errors import PreftuneError
from preftune.outputs.audit_page import write_unpaired_files


def looks_unpaired(source: Any, split: str | None = None) -> bool:
    """Whether the first file's first rows carry a `label` and no chosen/rejected answers (KTO's layout)."""
    inputs = resolve(source)
    rows = next(iter(iter_rows(inputs[0], split, CHUNK_ROWS)), [])
    dicts = [obj for _, obj in rows[:200] if isinstance(obj, dict) and not isinstance(obj, Bad)]
    labelled = sum(LABEL in obj and "chosen" not in obj and "rejected" not in obj for obj in dicts)
    return bool(dicts) and labelled * 2 > len(dicts)


def _lengths(records: list[dict], tokenizer: Any, limits: Limits) -> tuple[list[int], list[int], int, str]:
    """Prompt and completion lengths per record, how many records max_length would cut, and the unit."""
    if tokenizer is None:
        def words(v: Any) -> int:
            return len((v if isinstance(v, str) else " ".join(m["content"] for m in v)).split())
        return [words(r["prompt"]) for r in records], [words(r["completion"]) for r in records], 0, "words"
    texts = [render_record(tokenizer, r) for r in records]
    pairs, stats = tokenize_records(tokenizer, texts, max_length=limits.max_length,
                                    max_prompt_length=limits.max_prompt_length)
    cut = stats.prompt_truncated + stats.completion_truncated + len(stats.dropped_empty)
    return [len(p.prompt_ids) for p in pairs], [len(p.chosen_ids) for p in pairs], cut, "tokens"


def audit_unpaired(source: Any, *, tokenizer: Any, limits: Limits, show: int, **load_kwargs: Any) -> dict:
    """The audit of unpaired data as a JSON-able dict (`format_unpaired` prints it)."""
    load_kwargs.setdefault("skip_invalid", True)
    data: LoadedData = load_records(source, kind="unpaired", **load_kwargs)
    records = data.records
    origins = data.origins or [f"record {i + 1}" for i in range(len(records))]
    n_good = sum(bool(r[LABEL]) for r in records)
    n_bad = len(records) - n_good
    prompts, answers, cut, unit = _lengths(records, tokenizer, limits)
    by_label = {"desirable": [n for n, r in zip(answers, records) if r[LABEL]],
                "undesirable": [n for n, r in zip(answers, records) if not r[LABEL]]}
    seen: Counter[tuple[str, str, bool]] = Counter((value_key(r["prompt"]), value_key(r["completion"]), r[LABEL])
                                                   for r in records)
    both = {(p, c) for p, c, lab in seen if (p, c, not lab) in seen}
    report: dict[str, Any] = {
        "kind": "unpaired", "sources": list(data.sources), "summary": data.summary(), "examples_count": len(records),
        "desirable": n_good, "undesirable": n_bad, "invalid": [str(r) for r in data.invalid],
        "duplicates": sum(n - 1 for n in seen.values()), "labelled_both_ways": len(both),
        "lengths": {"unit": unit, "prompt": describe(prompts), "completion": describe(answers),
                    **{label: describe(lengths) for label, lengths in by_label.items()},
                    "histograms": {"prompt": histogram(prompts),
                                   **{label: histogram(lengths) for label, lengths in by_label.items()}}},
        "cut_by_limits": cut, "limits": {"max_length": limits.max_length, "max_prompt_length": limits.max_prompt_length},
        "examples": examples_from_records(records, origins, show, tokenizer=tokenizer, max_length=limits.max_length,
                                          max_prompt_length=limits.max_prompt_length),
    }
    for ex, record in zip(report["examples"], records):
        ex[LABEL] = record[LABEL]
    report["warnings"] = _warnings(report)
    return report


def _warnings(report: dict) -> list[str]:
    out = []
    good, bad = report["desirable"], report["undesirable"]
    if not (good and bad):
        out.append(f"only {'desirable' if good else 'undesirable'} examples: KTO needs both labels")
    elif (fits := weight_suggestion(good, bad)) is not None:
        (d_lo, d_hi), (u_lo, u_hi) = fits
        out.append(f"labels are imbalanced ({good:,} desirable vs {bad:,} undesirable): the KTO paper keeps "
                   f"desirable_weight·n_D / (undesirable_weight·n_U) in [1, 4/3]; train with --desirable-weight in "
                   f"[{d_lo:.3g}, {d_hi:.3g}] or --undesirable-weight in [{u_lo:.3g}, {u_hi:.3g}]")
    if report["labelled_both_ways"]:
        out.append(f"{report['labelled_both_ways']:,} prompt/completion pairs are labelled both desirable and "
                   "undesirable: their losses pull against each other")
    if report["cut_by_limits"]:
        out.append(f"{report['cut_by_limits']:,} examples are cut or dropped by max_length / max_prompt_length")
    return out


def format_unpaired(report: dict, show: int) -> str:
    """The terminal text of an unpaired audit."""
    lines = [report["summary"], f"labels: {report['desirable']:,} desirable, {report['undesirable']:,} undesirable"]
    lines += [f"  invalid: {row}" for row in report["invalid"][:10]]
    unit = report["lengths"]["unit"]
    for part in ("prompt", "completion"):
        d = report["lengths"][part]
        if d.get("count"):
            lines.append(f"{part} length ({unit}): median {d['median']}, p95 {d['p95']}, max {d['max']}")
    if report["duplicates"]:
        lines.append(f"exact duplicates: {report['duplicates']:,}")
    for i, ex in enumerate(report["examples"][:show], start=1):
        lines += format_example(ex, f"example {i}, {'desirable' if ex[LABEL] else 'undesirable'}")
    lines += [f"warning: {w}" for w in report["warnings"]] or ["no warnings"]
    return "\n".join(lines)


def run_inspect(args: Any) -> int:
    """`preftune inspect`: unpaired (KTO) data gets this module's audit (label counts and balance, lengths,
    examples; the JSON report with --output), pairs `preftune.audit.run_inspect`'s. Returns the exit status."""
    data = list(args.data) if isinstance(args.data, (list, tuple)) else args.data
    data = data[0] if isinstance(data, list) and len(data) == 1 else data  # one argument may be a glob or a folder
    if not looks_unpaired(data, args.split):
        return audit.run_inspect(args)
    if args.output and Path(args.output).suffix.lower() in (".png", ".html", ".htm"):
        raise PreftuneError(f"--output takes the JSON file name ({args.output} given); the PNG and HTML go beside it")
    tokenizer, context = None, None
    if args.model or args.tokenizer:
        from preftune.modeling.load import context_length, load_tokenizer  # transformers only when asked for

        tokenizer, context = load_tokenizer(args.model or args.tokenizer), context_length(args.model or args.tokenizer)
    limits = effective_limits(args.max_length, args.max_prompt_length, context)
    show = max(args.show, audit.PAGE_EXAMPLES) if args.output else args.show  # the page shows a few more
    report = audit_unpaired(data, tokenizer=tokenizer, limits=limits, show=show, split=args.split,
                            format=args.format, prompt_field=args.prompt_field, prompt_template=args.prompt_template)
    text = format_unpaired(report, args.show)
    print(text)
    if args.output:
        out = Path(args.output) if Path(args.output).suffix else Path(args.output).with_suffix(".json")
        png, page = write_unpaired_files(report, text, out)
        print(f"wrote {out}, {png} and {page}")
    return 0
