"""Does the gap itself matter? The on-policy story's gap experiment (`python -m examples.news_demo --on-policy`) draws
its small-gap and large-gap pairs from different prompts, and its small-gap pairs often have a bad chosen summary
(a wrong fact over a vague one). This one holds the prompt and the chosen answer fixed and varies only the
rejected one:

    .venv/bin/python bench/onpolicy_gap.py                       # 1000 training prompts, K 4, seed 0 (~3 min)

1. `preftune pairs` with `select: all-pairs` on the story's prompts (the same K samples as the story: same seed,
   same per-answer streams), scored by the demo's graded judge;
2. for each prompt whose best summary has both a lower one within `--small` (gap ≤ 3) and one at least `--large`
   below it (gap ≥ 5): the pair (best, nearest of those within 3) goes to the small set, (best, worst) to the
   large set. Same prompts, same chosen answers, as many pairs in each;
3. DPO on each set under the story's two settings, the 200 held-out articles judged as the story judges them.

Writes bench/results/onpolicy_gap-<label>-<time>.json and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the repository root: the demo lives in examples/, outside the package

from examples.news_demo import news  # noqa: E402
from examples.news_demo.base import ASSETS_BASE, write_jsonl  # noqa: E402
from examples.news_demo.judge import judge_summary  # noqa: E402
from examples.news_demo.onpolicy import PAIRS_JUDGE, OnPolicySettings, evaluate_models  # noqa: E402
from examples.news_demo.pipeline import train_dpo  # noqa: E402
from preftune.onpolicy import PairsConfig, make_pairs  # noqa: E402


def matched(rows: list[dict], small: float, large: float) -> tuple[list[dict], list[dict]]:
    """Per prompt, (best, nearest below within `small`) and (best, worst at least `large` below), the same best
    answer on both sides; prompts lacking either are left out."""
    by_prompt: dict[int, list[dict]] = defaultdict(list)
    for r in rows:
        by_prompt[r["source"]["prompt_index"]].append(r)
    lo, hi = [], []
    for _, group in sorted(by_prompt.items()):
        best = max(r["score_chosen"] for r in group)
        top = [r for r in group if r["score_chosen"] == best]
        widest = max(top, key=lambda r: r["gap"])  # all-pairs lists larger gaps first: the first such row
        same = [r for r in top if r["source"]["chosen_sample"] == widest["source"]["chosen_sample"]]
        near = min(same, key=lambda r: r["gap"])
        if widest["gap"] >= large and near["gap"] <= small:
            lo.append(near)
            hi.append(widest)
    return lo, hi


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--output-dir", default="runs/bench-onpolicy-gap")
    ap.add_argument("--articles", type=int, default=1000)
    ap.add_argument("--eval-articles", type=int, default=200)
    ap.add_argument("--small", type=float, default=3.0)
    ap.add_argument("--large", type=float, default=5.0)
    ap.add_argument("--label", default="cpu")
    args = ap.parse_args()
    t0, load = time.time(), os.getloadavg()[0]
    out = Path(args.output_dir)
    settings = OnPolicySettings()
    articles = news.generate_articles(args.articles, seed=1000, split="train")  # the story's prompts (seed 0)
    prompts = write_jsonl(out / "prompts.jsonl", ({"prompt": news.make_prompt(a)} for a in articles))
    res = make_pairs(PairsConfig(model=str(ASSETS_BASE), prompts=str(prompts), output=str(out / "all_pairs.jsonl"),
                                 judge=PAIRS_JUDGE, select="all-pairs", samples=settings.samples,
                                 temperature=settings.temperature, max_new_tokens=settings.demo.max_new_tokens,
                                 seed=0, batch_size=settings.sample_batch_size, device="cpu"))
    rows = [json.loads(line) for line in res.output.read_text().splitlines()]
    small, large = matched(rows, args.small, args.large)
    files = {"small": write_jsonl(out / "small.jsonl", small), "large": write_jsonl(out / "large.jsonl", large)}
    print(f"{len(rows):,} pairs (all-pairs) from {args.articles:,} prompts; {len(small)} prompts give both a pair "
          f"with gap <= {args.small:g} and one with gap >= {args.large:g} from the same best summary")
    held = news.generate_articles(args.eval_articles, seed=0, split="heldout")
    models: dict[str, dict] = {}
    for i, recipe in enumerate(settings.gap_recipes):
        for name in ("small", "large"):
            run = train_dpo(ASSETS_BASE, files[name], out / f"dpo-{name}-{i}", settings.demo, seed=0, progress=False,
                            steps=settings.gap_steps, learning_rate=recipe.learning_rate, beta=recipe.beta,
                            sft_weight=recipe.sft_weight)
            models[f"{name}-{i}"] = {"label": f"{name} gap, {recipe.label}, lr {recipe.learning_rate:g}",
                                     "dir": str(run.final_dir), "recipe": recipe.label}
    evaluate_models(models, held, settings.demo, judge_summary)
    for m in models.values():
        x = m["metrics"]
        print(f"{m['label']:<40} good {100 * x['good_rate']:5.1f}%  95% Wilson {100 * x['good_ci95'][0]:5.1f}% .. "
              f"{100 * x['good_ci95'][1]:5.1f}%  factual {100 * x['factual_rate']:5.1f}%  words {x['mean_words']:5.1f}")
    result = {"label": args.label, "time": time.strftime("%Y-%m-%d %H:%M:%S"), "load_avg_start": load,
              "load_avg_end": os.getloadavg()[0], "seconds": round(time.time() - t0, 1),
              "threads": torch.get_num_threads(), "articles": args.articles,
              "pairs_all": len(rows), "matched_pairs_each": len(small), "small": args.small, "large": args.large,
              "gap_median": {"small": sorted(r["gap"] for r in small)[len(small) // 2] if small else None,
                             "large": sorted(r["gap"] for r in large)[len(large) // 2] if large else None},
              "models": {k: {kk: v for kk, v in m.items() if kk != "dir"} for k, m in models.items()}}
    path = HERE / "results" / f"onpolicy_gap-{args.label}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"written: {path} ({result['seconds']:.0f} s, load average {load:.1f} at the start)")


if __name__ == "__main__":
    main()
