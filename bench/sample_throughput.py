"""Sampling K answers per prompt (`preftune.generate.sample_completions`, what `preftune pairs` uses): samples/s and
tokens/s batched against one prompt at a time, and transformers' own `generate` on the same batches for scale.

    .venv/bin/python bench/sample_throughput.py                        # the fixture model, 32 prompts, K 4, 64 tokens
    .venv/bin/python bench/sample_throughput.py --prompts 16 --samples 8 --max-new-tokens 32 --threads 1

The model is bench/fixture.py's (Llama, hidden 256, 4 layers, vocab 8,192, random weights: it never emits EOS,
so every answer runs to --max-new-tokens, the case with nothing to gain from dropping finished answers); the
prompts are the first --prompts prompts of its response-heavy set (~128 tokens). Modes, each warmed up once, then
timed --repeats times interleaved (the best time is reported, all are written):

- batched:          sample_completions, --batch-size answers decoded together (batch_size // K prompts a batch);
- one prompt:       sample_completions with batch_size = K: one prompt (its K answers share its prefill) a batch;
- hf generate:      transformers' `model.generate(do_sample=True, num_return_sequences=K, top_k=0)` on the same
                    left-padded prompt batches (it runs each prompt K times through the prefill).

Writes bench/results/sample_throughput-<label>-<time>.json with the machine's load average.
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
sys.path.insert(0, str(HERE))

from fixture import build  # noqa: E402

from preftune.generate import Sampling, encode_prompt, load_model_for_generation, sample_completions  # noqa: E402


def _hf_generate(model, tok, ids: list[list[int]], k: int, max_new: int, per: int) -> int:
    """transformers' generate on left-padded batches of `per` prompts; returns the tokens generated."""
    tokens = 0
    for s in range(0, len(ids), per):
        batch = ids[s:s + per]
        width = max(len(p) for p in batch)
        x = torch.full((len(batch), width), tok.pad_token_id)
        mask = torch.zeros_like(x)
        for row, p in enumerate(batch):
            x[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        out = model.generate(input_ids=x, attention_mask=mask, do_sample=True, top_k=0, top_p=1.0,
                             num_return_sequences=k, max_new_tokens=max_new, min_new_tokens=max_new,
                             pad_token_id=tok.pad_token_id)
        tokens += out[:, width:].numel()
    return tokens


def _timed(fn) -> tuple[float, int]:
    t0 = time.perf_counter()
    tokens = fn()
    return time.perf_counter() - t0, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per mode (the best is reported)")
    ap.add_argument("--label", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    fx = build({"response_heavy": max(args.prompts, 64)}, log=lambda m: print(m, file=sys.stderr))
    model, tok = load_model_for_generation(str(fx.model_dir), device="cpu")
    rows = [json.loads(x) for x in fx.data["response_heavy"].read_text().splitlines()[:args.prompts]]
    ids = [encode_prompt(tok, r["prompt"]) for r in rows]
    k, n_new = args.samples, args.max_new_tokens
    sampling = Sampling(max_new_tokens=n_new, temperature=1.0, seed=0)

    def ours(batch_size: int):
        return lambda: sum(c.num_tokens for answers in sample_completions(
            model, tok, ids, samples=k, sampling=sampling, batch_size=batch_size) for c in answers)

    modes = {f"batched (batch {args.batch_size} answers = {args.batch_size // k} prompts)": ours(args.batch_size),
             f"one prompt at a time (batch {k} answers)": ours(k),
             f"hf generate, batches of {args.batch_size // k} prompts": lambda: _hf_generate(
                 model, tok, ids, k, n_new, max(1, args.batch_size // k))}
    load = os.getloadavg()[0]
    for fn in modes.values():
        fn()  # warm-up: allocator, kernels
    times: dict[str, list[float]] = {name: [] for name in modes}
    tokens: dict[str, int] = {}
    for _ in range(args.repeats):  # interleaved, so a burst of load elsewhere hits every mode alike
        for name, fn in modes.items():
            seconds, tokens[name] = _timed(fn)
            times[name].append(seconds)
    results = []
    answers = len(ids) * k
    for name in modes:
        best = min(times[name])
        results.append({"mode": name, "seconds_best": round(best, 3), "seconds_all": [round(t, 3) for t in times[name]],
                        "answers": answers, "tokens": tokens[name], "samples_per_s": round(answers / best, 1),
                        "tokens_per_s": round(tokens[name] / best, 1)})
        print(f"{name:55s} best {best:6.2f} s  {answers / best:8.1f} samples/s  {tokens[name] / best:9.1f} tokens/s  "
              f"(all: {', '.join(f'{t:.2f}' for t in times[name])})")
    prompt_mean = sum(map(len, ids)) / len(ids)
    out = {"label": args.label, "time": time.strftime("%Y-%m-%d %H:%M:%S"), "load_avg_start": load,
           "load_avg_end": os.getloadavg()[0], "threads": args.threads, "machine": platform.processor() or platform.machine(),
           "model": fx.model, "prompts": len(ids), "prompt_tokens_mean": round(prompt_mean, 1), "samples": k,
           "max_new_tokens": n_new, "torch": torch.__version__, "results": results}
    path = HERE / "results" / f"sample_throughput-{args.label}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"written: {path} (load average {load:.1f} at the start)")


if __name__ == "__main__":
    main()
