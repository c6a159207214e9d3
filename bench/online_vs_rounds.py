"""Online DPO (`train --online`) against rounds of iterative DPO (`iterate`) on the news demo: the cost of a step
and the judged held-out good share after the same number of optimizer steps (BENCHMARKS.md, "online DPO").

    .venv/bin/python bench/online_vs_rounds.py --steps 150 --rounds-json /tmp/preftune-iterate-bench/candidate/rounds.json

The online run uses iterate's defaults (beta 0.5, sft_weight 1, batches of 16 prompts, cosine with 10%
warmup) and the demo's learning rate 3e-4, with TRL's online sampling (two answers per prompt, temperature 0.9, at most 64 new tokens), the prompts
and graded judge of bench/iterate_defaults.py; then its greedy answers to the 200 held-out articles are judged
(`onpolicy.iterate_eval.evaluate_answers`, as iterate evaluates a round). Per step it reports the seconds spent
sampling, judging and training (metrics.jsonl); a round's seconds per phase come from iterate's rounds.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT)]

from iterate_defaults import COMMON, write_prompts  # noqa: E402

from preftune import TrainConfig, train  # noqa: E402
from preftune.onpolicy.iterate_config import IterateConfig  # noqa: E402
from preftune.onpolicy.iterate_eval import evaluate_answers  # noqa: E402
from preftune.onpolicy.pairs import open_judge  # noqa: E402
from preftune.onpolicy.prompts import load_prompts  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--work", default="/tmp/preftune-online-bench")
    p.add_argument("--rounds-json", default="", help="an iterate run's rounds.json to set beside the online run")
    args = p.parse_args(argv)
    work = Path(args.work)
    prompts, held = write_prompts(work / "prompts")
    defaults = IterateConfig(model=COMMON["model"], prompts=str(prompts), output_dir=str(work / "unused"),
                             judge=COMMON["judge"])
    cfg = TrainConfig(model=COMMON["model"], online=True, prompts=str(prompts), judge=COMMON["judge"],
                      output_dir=str(work / "online"), overwrite=True, max_steps=args.steps, beta=defaults.beta,
                      sft_weight=defaults.sft_weight, learning_rate=3e-4,
                      batch_size=defaults.batch_size, max_new_tokens=64, max_length=320, max_prompt_length=224,
                      progress=False, seed=0)
    t0 = time.time()
    result = train(cfg)
    wall = time.time() - t0
    rows = [json.loads(x) for x in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["split"] == "train"]
    per_step = {k: sum(r[k] for r in train_rows) / len(train_rows) for k in ("online/sample_s", "online/judge_s")}
    # A logged step's seconds (pairs / pairs_per_s) hold its sampling and judging too (step_batch runs inside it).
    timed = [r for r in train_rows if r["online/pairs"]]
    per_step["step_s"] = sum(r["online/pairs"] / r["pairs_per_s"] for r in timed) / len(timed)
    per_step["train_s"] = per_step["step_s"] - sum(r["online/sample_s"] + r["online/judge_s"] for r in timed) / len(timed)
    per_step["pairs"] = sum(r["online/pairs"] for r in train_rows) / len(train_rows)
    per_step["wall_s"] = wall / args.steps
    judge_cfg = IterateConfig(model=COMMON["model"], prompts=str(prompts), output_dir=str(work / "unused"),
                              judge=COMMON["judge"], good_score=1.0, max_new_tokens=64, device="cpu")
    judge = open_judge(judge_cfg.pairs_config(COMMON["model"], str(prompts), "x.jsonl", seed=0))
    ev = evaluate_answers(str(result.final_dir), load_prompts(str(held)).prompts, judge, judge_cfg, device="cpu",
                          kl_to={"first": COMMON["model"]})
    out = {"steps": args.steps, "wall_s": round(wall, 1), "per_step": per_step,
           "good_share": ev["greedy"]["good_share"], "score_mean": ev["greedy"]["score_mean"],
           "kl_first": ev["kl_first"]["per_token"], "load_average": os.getloadavg()}
    if args.rounds_json:
        rounds = json.loads(Path(args.rounds_json).read_text())["rounds"]
        out["rounds"] = [{k: r.get(k) for k in ("round", "steps", "good_share", "kl_first", "seconds")} for r in rounds]
    dest = HERE / "results" / f"online_vs_rounds-{time.strftime('%Y%m%d-%H%M%S')}.json"
    dest.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))
    print(f"written: {dest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
