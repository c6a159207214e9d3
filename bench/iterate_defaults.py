"""How `preftune iterate`'s defaults were chosen: rounds of on-policy DPO on the news demo's SFT model under several
settings, the judged held-out good share round by round (BENCHMARKS.md, "iterate").

    .venv/bin/python bench/iterate_defaults.py                      # every setting below, 3 rounds each
    .venv/bin/python bench/iterate_defaults.py --only candidate,plain-dpo --rounds 2

The model is examples/news_demo/assets/base (0.4M-parameter Llama, SFT on a newsroom's mixed styles); the prompts
are 1,000 training articles (seed 1000) and 200 held-out ones (seed 0, unseen organisation/place pairs), judged by
bench/news_graded_judge.py (1.0 = the demo's "good", partial credit below). Every setting shares the rest: K
answers per prompt at the given temperature, best vs worst, one epoch of the round's pairs in batches of 16,
cosine schedule with 10% warmup, max_new_tokens 64. Each run is `preftune.iterate` in its own subprocess; its
rounds.json is copied into the results file bench/results/iterate_defaults-<time>.json, and a table is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT)]

# name → the settings it changes from the candidate (iterate's defaults at the demo's learning rate 3e-4)
SETTINGS: dict[str, dict] = {
    "candidate": {},
    "plain-dpo": {"beta": 0.1, "sft_weight": 0.0, "learning_rate": 1e-4},
    "plain-dpo-lr5e-4": {"beta": 0.1, "sft_weight": 0.0, "learning_rate": 5e-4},
    "beta1": {"beta": 1.0, "sft_weight": 0.0, "learning_rate": 3e-4},
    "candidate-lr1e-3": {"learning_rate": 1e-3},
    "candidate-lr1e-4": {"learning_rate": 1e-4},
    "candidate-K8": {"samples": 8},
    "candidate-T0.7": {"temperature": 0.7},
    "candidate-2epochs": {"num_epochs": 2.0},
    "candidate-fixed": {"reference_mode": "fixed"},
    "candidate-seed1": {"seed": 1},
    "candidate-again": {},  # the candidate once more, uninterrupted, for its seconds per phase
    # a learning rate far too high for plain DPO: what the collapse check sees (the run rolls round 1 back)
    "forced-collapse": {"beta": 0.1, "sft_weight": 0.0, "learning_rate": 1e-2},
}
COMMON = dict(model=str(ROOT / "examples/news_demo/assets/base"), judge=str(HERE / "news_graded_judge.py") + ":score",
              learning_rate=3e-4, good_score=1.0, max_new_tokens=64, max_length=256, max_prompt_length=224, progress=False,
              device="cpu")


def write_prompts(folder: Path) -> tuple[Path, Path]:
    from news_graded_judge import HELDOUT, TRAIN

    from examples.news_demo import news

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name, articles in (("train", TRAIN), ("heldout", HELDOUT)):
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"prompt": news.make_prompt(a)}) + "\n" for a in articles))
        out.append(path)
    return out[0], out[1]


def run_one(name: str, changes: dict, rounds: int, work: Path, prompts: Path, held: Path) -> dict:
    out = work / name
    cfg = {**COMMON, **changes, "prompts": str(prompts), "eval_prompts": str(held), "rounds": rounds,
           "output_dir": str(out), "resume": out.exists()}
    script = ("import json, sys; from preftune import iterate; "
              "iterate(**json.loads(sys.argv[1]), say=lambda line: print(line, flush=True))")
    t0 = time.time()
    log = (work / f"{name}.log").open("w")
    subprocess.run([sys.executable, "-c", script, json.dumps(cfg)], cwd=ROOT, check=True, stdout=log,
                   stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    rounds_json = json.loads((out / "rounds.json").read_text())
    return {"name": name, "changes": changes, "seconds": round(time.time() - t0, 1), **rounds_json}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default="", help="comma-separated setting names (default: all)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--work", default="/tmp/preftune-iterate-bench")
    args = p.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or list(SETTINGS)
    work = Path(args.work)
    prompts, held = write_prompts(work / "prompts")
    results = []
    for name in names:
        res = run_one(name, SETTINGS[name], args.rounds, work, prompts, held)
        results.append(res)
        cells = " | ".join(f"{r['good_share'] * 100:.1f}%" if r.get("good_share") is not None else "-"
                           for r in res["rounds"])
        print(f"{name:20s} {res['seconds']:7.1f}s  good by round: {cells}  stopped: {res['stopped']}", flush=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = HERE / "results" / f"iterate_defaults-{stamp}.json"
    dest.write_text(json.dumps({"load_average": os.getloadavg(), "results": results}, indent=1) + "\n")
    print(f"written: {dest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
