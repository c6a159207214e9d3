"""Sampling throughput on the news demo (what the on-policy story's `preftune pairs` stage spends its time on):
samples/s and tokens/s of `preftune.generate.sample_completions` by batch size, from one prompt at a time (its K
answers a batch) to 512 answers decoded together.

    .venv/bin/python bench/demo_sampling.py                    # 128 training prompts, K 4, 64 new tokens, 2 threads
    .venv/bin/python bench/demo_sampling.py --batch-sizes 4 256 --threads 1 --repeats 5

Unlike bench/sample_throughput.py's random-weight model, the demo's SFT base (examples/news_demo/assets/base, 0.4M
parameters, word-level vocabulary of 695) stops by itself: its summaries are ~20 tokens, so answers leave the
batch at different steps. Prompts are ~115 tokens (the instruction and a 4-paragraph article). Tokens are answer
tokens, the closing EOS not counted (as `preftune pairs` counts them). Each mode is warmed up once, then timed
--repeats times interleaved; the best time is reported, all are written, with the load average, to
bench/results/demo_sampling-<label>-<time>.json. Each answer is drawn from its own seeded stream, so every batch
size must give the same answers: the script checks it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the repository root: the demo lives in examples/, outside the package

from examples.news_demo import news  # noqa: E402
from examples.news_demo.base import ASSETS_BASE  # noqa: E402
from preftune.generate import Sampling, encode_prompt, load_model_for_generation, sample_completions  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 32, 64, 128, 256, 512],
                    help="answers decoded together; the first, = --samples, is one prompt at a time")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the demo runs with the default, 2 here)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--label", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model_for_generation(str(ASSETS_BASE), device="cpu")
    articles = news.generate_articles(args.prompts, seed=1000, split="train")  # the on-policy story's prompts
    ids = [encode_prompt(tok, news.make_prompt(a)) for a in articles]
    sampling = Sampling(max_new_tokens=args.max_new_tokens, temperature=1.0, seed=0)

    def run(batch_size: int) -> tuple[list[list[str]], int]:
        outs = sample_completions(model, tok, ids, samples=args.samples, sampling=sampling, batch_size=batch_size)
        return [[c.text for c in answers] for answers in outs], sum(c.num_tokens for a in outs for c in a)

    load = os.getloadavg()[0]
    texts: dict[int, list[list[str]]] = {}
    for bs in args.batch_sizes:  # warm-up, and the answers each batch size gives
        texts[bs], _ = run(bs)
    same = all(t == texts[args.batch_sizes[0]] for t in texts.values())
    times: dict[int, list[float]] = {bs: [] for bs in args.batch_sizes}
    tokens = 0
    for _ in range(args.repeats):  # interleaved, so a burst of load elsewhere hits every batch size alike
        for bs in args.batch_sizes:
            t0 = time.perf_counter()
            _, tokens = run(bs)
            times[bs].append(time.perf_counter() - t0)
    answers = len(ids) * args.samples
    results = []
    for bs in args.batch_sizes:
        best = min(times[bs])
        name = f"batch {bs} answers ({max(1, bs // args.samples)} prompt{'s' if bs // args.samples > 1 else ''})"
        results.append({"mode": name, "batch_size": bs, "seconds_best": round(best, 3),
                        "seconds_all": [round(t, 3) for t in times[bs]], "answers": answers, "tokens": tokens,
                        "samples_per_s": round(answers / best, 1), "tokens_per_s": round(tokens / best, 1)})
        print(f"{name:34s} best {best:6.2f} s  {answers / best:7.1f} samples/s  {tokens / best:8.1f} tokens/s  "
              f"(all: {', '.join(f'{t:.2f}' for t in times[bs])})")
    print(f"same answers at every batch size: {same}; {tokens:,} answer tokens "
          f"({tokens / answers:.1f} per answer), prompts {sum(map(len, ids)) / len(ids):.0f} tokens on average")
    out = {"label": args.label, "time": time.strftime("%Y-%m-%d %H:%M:%S"), "load_avg_start": load,
           "load_avg_end": os.getloadavg()[0], "threads": args.threads, "cpus": os.cpu_count(),
           "machine": platform.processor() or platform.machine(), "model": str(ASSETS_BASE.relative_to(HERE.parent)),
           "prompts": len(ids), "prompt_tokens_mean": round(sum(map(len, ids)) / len(ids), 1),
           "samples": args.samples, "max_new_tokens": args.max_new_tokens, "same_answers": same,
           "torch": torch.__version__, "results": results}
    path = HERE / "results" / f"demo_sampling-{args.label}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"written: {path} (load average {load:.1f} at the start, {out['load_avg_end']:.1f} at the end)")


if __name__ == "__main__":
    main()
