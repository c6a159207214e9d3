"""The summary of a `preftune pairs` run, computed from the done lines of every prompt (so a resumed run and an
uninterrupted one summarise the same), printed and written to OUT.summary.json."""

from __future__ import annotations

from typing import Any

from preftune.data.stats import compact_number, describe, histogram

LONGER_WARNING = 0.7  # share of pairs (with answers of different lengths) whose chosen answer is the longer
LONGER_MIN_PAIRS = 10  # fewer pairs say nothing about a bias
GAP_QUANTILES = (("p5", 0.05), ("p25", 0.25), ("median", 0.5), ("p75", 0.75), ("p95", 0.95))


def summarize(done: list[dict], *, prompts: int, repeated: int, model: str, judge: str, select: str, min_gap: float,
              max_new_tokens: int, timing: dict[str, float] | None = None, output: str = "") -> dict[str, Any]:
    """Counts, the gap distribution and the length bias of the kept pairs, from every prompt's done line; `model`,
    `judge`, `select`, `min_gap` and `max_new_tokens` are the run's, shown with them."""
    sampled = [d for d in done if "skip" not in d]
    pairs = [p for d in sampled for p in d["pairs"]]
    gaps = [p[0] for p in pairs]
    longer = sum(c > r for _, c, r in pairs)
    unequal = sum(c != r for _, c, r in pairs)
    share = longer / unequal if unequal else None
    summary: dict[str, Any] = {
        "output": output, "model": model, "judge": judge, "select": select, "min_gap": min_gap,
        "prompts": prompts, "prompts_repeated_in_file": repeated,
        "prompts_too_long": len(done) - len(sampled),
        "samples": sum(d["k"] for d in sampled),
        "distinct_answers": sum(d["u"] for d in sampled),
        "identical_answers_collapsed": sum(d["k"] - d["u"] - d.get("empty", 0) for d in sampled),
        "empty_answers": sum(d.get("empty", 0) for d in sampled),
        "answers_cut": sum(d["cut"] for d in sampled),
        "pairs": len(pairs),
        "prompts_with_pairs": sum(bool(d["pairs"]) for d in sampled),
        "dropped": {"ties": sum(d["ties"] for d in sampled), "small_gap": sum(d["small_gap"] for d in sampled),
                    "over_max_pairs_per_prompt": sum(d["over_cap"] for d in sampled),
                    "prompts_with_one_distinct_answer": sum(d["u"] < 2 for d in sampled)},
        "gap": describe(gaps, GAP_QUANTILES),
        "gap_histogram": histogram(gaps, bins=20),
        "length": {"unit": "tokens", "pairs_with_unequal_lengths": unequal,
                   "chosen_longer": compact_number(share) if share is not None else None},
        "warnings": [],
    }
    if share is not None and share > LONGER_WARNING and unequal >= LONGER_MIN_PAIRS:
        summary["warnings"].append(
            f"the judge preferred the longer answer in {100 * share:.0f}% of the pairs whose answers differ in "
            f"length (above {100 * LONGER_WARNING:.0f}%): judges' length bias is the classic trap, and DPO on these "
            "pairs learns to write longer; check the judge, or train with a length-normalised loss (ipo, simpo)")
    cut = summary["answers_cut"]
    if summary["samples"] and cut / summary["samples"] > 0.5:
        summary["warnings"].append(f"{cut:,} of {summary['samples']:,} answers were cut at --max-new-tokens "
                                   f"{max_new_tokens}: raise it, or pass --missing-eos-penalty")
    if timing and timing.get("sample_s"):
        summary["this_run"] = {"samples": timing["samples"], "tokens": timing["tokens"],
                               "sample_seconds": round(timing["sample_s"], 2),
                               "judge_seconds": round(timing["judge_s"], 2),
                               "samples_per_s": round(timing["samples"] / timing["sample_s"], 2),
                               "tokens_per_s": round(timing["tokens"] / timing["sample_s"], 1)}
    return summary


def format_summary(s: dict[str, Any]) -> str:
    """The lines printed at the end of a run."""
    d = s["dropped"]
    lines = [f"pairs: {s['pairs']:,} from {s['prompts_with_pairs']:,} of {s['prompts']:,} prompts; "
             f"{s['samples']:,} answers sampled, {s['identical_answers_collapsed']:,} identical collapsed, "
             f"{s['answers_cut']:,} cut at max_new_tokens"
             + (f", {s['empty_answers']:,} empty (not judged)" if s["empty_answers"] else ""),
             f"  dropped: {d['ties']:,} ties, {d['small_gap']:,} below min_gap {s['min_gap']:g}, "
             f"{d['prompts_with_one_distinct_answer']:,} prompts with one distinct answer"
             + (f", {d['over_max_pairs_per_prompt']:,} over max_pairs_per_prompt" if d["over_max_pairs_per_prompt"]
                else "")
             + (f", {s['prompts_too_long']:,} prompts too long for the model" if s["prompts_too_long"] else "")]
    g = s["gap"]
    if g.get("count"):
        lines.append(f"  gap (chosen − rejected score): min {g['min']:g}  p25 {g['p25']:g}  median {g['median']:g}  "
                     f"p75 {g['p75']:g}  max {g['max']:g}  mean {g['mean']:g}")
    if s["length"]["chosen_longer"] is not None:
        lines.append(f"  chosen is the longer answer in {100 * s['length']['chosen_longer']:.0f}% of the "
                     f"{s['length']['pairs_with_unequal_lengths']:,} pairs whose answers differ in length")
    if "this_run" in s:
        t = s["this_run"]
        lines.append(f"  this run: {t['samples_per_s']:g} samples/s, {t['tokens_per_s']:g} tokens/s sampling; "
                     f"{t['sample_seconds']:g} s sampling, {t['judge_seconds']:g} s judging")
    lines += [f"warning: {w}" for w in s["warnings"]]
    lines.append(f"written: {s['output']} (summary beside it)")
    return "\n".join(lines)
