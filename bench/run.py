"""preftune vs TRL's DPOTrainer: same model, data, batch, hyperparameters, precision and threads.

    .venv/bin/python bench/run.py                     # both sets, 3 alternating runs each (make bench)
    .venv/bin/python bench/run.py --trl-variants all  # also TRL with the Trainer's length-grouped sampler
    .venv/bin/python bench/run.py --check-exact       # preftune all optimizations on vs all off, 20 steps
    .venv/bin/python bench/run.py --vocab 2048        # another fixture shape (also --hidden, --layers)
    .venv/bin/python bench/run.py --quick             # 1 run each, 2 steps: a smoke test

Method (see BENCHMARKS.md for the figures):
- Each run is its own subprocess (`--child`), so peak RSS (ru_maxrss) is per run and nothing is shared or
  cached between runs. Runs alternate (preftune, trl, preftune, trl, ...) so a slow spell on this shared
  machine hits both; the medians and their ratios are what count.
- Both train one epoch over the same S x B pairs (S steps of B pairs), fp32, AdamW, constant LR, beta 0.1,
  sigmoid loss, max_length large enough that nothing is truncated, with the reference log-probs
  precomputed over the data before training (TRL's `precompute_ref_log_probs=True`, preftune's default).
- One torch thread per run by default (--threads): on a loaded 2-core machine a 2-thread run stalls at
  every parallel region whenever one of its threads is descheduled. CPU-time throughput is recorded
  next to wall-clock throughput as a check that is less sensitive to the load.
- "train" throughput = pairs / wall time of the optimizer steps (all S steps). "end-to-end" runs from
  the loaded model to the last step: tokenization, the reference pass, the steps. Model loading,
  imports and the final save are excluded from both.
- tokens/s counts each pair's unique tokens: prompt once + chosen + rejected (EOS included).
- FLOP/s = 6 x N x T / train time, N = matmul parameters (all but the input embedding table),
  T = prompt+chosen plus prompt+rejected tokens (the two rows a standard DPO step runs through
  the model), i.e. the *useful* work, identical for both tools; attention-score FLOPs are left
  out. It is shown as a fraction of a measured fp32 torch.mm peak on the same threads, next to an
  estimate of the FLOPs each tool really executes (`executed_flops`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import fixture  # noqa: E402

RESULTS = HERE / "results"

HYPER = dict(learning_rate=1e-5, beta=0.1, seed=0)


# ----------------------------------------------------------------------------- child processes

def _set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)
    torch.set_num_interop_threads(1)


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class Clock:
    """Wall and CPU seconds at named moments; CPU time is what a busy shared machine distorts least."""

    def __init__(self) -> None:
        self.marks: dict[str, tuple[float, float]] = {}
        self.excluded = [0.0, 0.0]

    def mark(self, name: str, first_only: bool = True) -> None:
        if not (first_only and name in self.marks):
            self.marks[name] = (time.perf_counter(), time.process_time())

    def span(self, a: str, b: str) -> tuple[float, float]:
        (wa, ca), (wb, cb) = self.marks[a], self.marks[b]
        return wb - wa, cb - ca

    def timed(self, fn, key: str | None = None):
        """Wrap `fn`; its duration is excluded from spans (model loading), or stored under `key`."""
        def wrapper(*a, **k):
            w0, c0 = time.perf_counter(), time.process_time()
            try:
                return fn(*a, **k)
            finally:
                dw, dc = time.perf_counter() - w0, time.process_time() - c0
                if key is None:
                    self.excluded[0] += dw
                    self.excluded[1] += dc
                else:
                    self.marks[key] = (self.marks.get(key, (0.0, 0.0))[0] + dw, self.marks.get(key, (0.0, 0.0))[1] + dc)
        return wrapper

    def result(self) -> dict:
        train_w, train_c = self.span("train_begin", "end")
        e2e_w, e2e_c = self.span("start", "end")
        ref_w, ref_c = self.marks.get("reference", (0.0, 0.0))
        return {"train_s": train_w, "train_cpu_s": train_c, "end_to_end_s": e2e_w - self.excluded[0],
                "end_to_end_cpu_s": e2e_c - self.excluded[1], "reference_s": ref_w, "reference_cpu_s": ref_c}


def child_preftune(job: dict) -> dict:
    """One preftune run; timings come from wrapping the loop's own functions, not from editing it.

    start → train(): tokenizer, data, (model load: excluded), reference pass; the first `Window()` is
    created just before the first step (train_begin); `save_final` is called right after the last (end).
    """
    _set_threads(job["threads"])
    # Import up front what train() imports lazily: the TRL run has all of its imports done before its clock
    # starts too.
    import accelerate  # noqa: F401
    import preftune.loop as loop
    import tqdm.auto  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    import preftune.data.load  # noqa: F401
    import preftune.data.render  # noqa: F401
    import preftune.modeling.reference as refs
    from preftune import TrainConfig
    from preftune.outputs.metrics import read_metrics

    for mod, name in ((loop, "load_model"), (loop, "save_final"), (loop, "Window"), (refs, "precompute")):
        if not hasattr(mod, name):
            raise SystemExit(f"bench: preftune has no {mod.__name__}.{name}; update bench/run.py's timing hooks")
    clock = Clock()
    orig_save, orig_window_init = loop.save_final, loop.Window.__init__

    def window_init(self, *a, **k):
        clock.mark("train_begin")
        orig_window_init(self, *a, **k)

    def save_final(*a, **k):
        clock.mark("end")
        return orig_save(*a, **k)

    loop.load_model = clock.timed(loop.load_model)
    refs.precompute = clock.timed(refs.precompute, key="reference")
    loop.Window.__init__, loop.save_final = window_init, save_final
    opt = job["preftune_options"]
    cfg = TrainConfig(model=job["model"], data=job["data"], output_dir=job["out"], max_steps=job["steps"],
                      batch_size=job["batch_size"], loss="sigmoid", max_length=job["max_length"],
                      max_prompt_length=job["max_prompt_length"], progress=False, overwrite=True,
                      logging_steps=1, warmup_ratio=0.0, lr_scheduler="constant", dtype="float32",
                      gradient_accumulation_steps=job.get("grad_accum", 1), **{**HYPER, **job.get("hyper", {})},
                      **opt)
    clock.mark("start")
    loop.train(cfg)
    rows = [r for r in read_metrics(job["out"]) if r["split"] == "train"]
    return {**clock.result(), "steps": len(rows), "losses": [r["loss"] for r in rows],
            "peak_rss_mib": _peak_rss_mib()}


def child_trl(job: dict) -> dict:
    """One TRL DPOTrainer run; the model is loaded before the clock starts, as preftune's load is excluded.

    start → tokenizer, data, DPOTrainer(...) (tokenization, reference pass); on_train_begin (train_begin);
    the last on_step_end (end).
    """
    _set_threads(job["threads"])
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    variant = job["trl_variant"]
    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32)
    clock = Clock()
    losses: list[float] = []

    class Hooks(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            clock.mark("train_begin")

        def on_step_end(self, args, state, control, **kw):
            clock.mark("end", first_only=False)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    DPOTrainer._precompute_ref_logps = clock.timed(DPOTrainer._precompute_ref_logps, key="reference")
    extra = {}
    if variant.get("group_by_length"):
        # The Trainer's LengthGroupedSampler reads a `length` column; the unused-column filter runs before
        # the sampler is built, so it must be off (the collator ignores the extra columns).
        extra = dict(train_sampling_strategy="group_by_length", remove_unused_columns=False)
    args = DPOConfig(output_dir=job["out"], per_device_train_batch_size=job["batch_size"], max_steps=job["steps"],
                     gradient_accumulation_steps=1, learning_rate=HYPER["learning_rate"], beta=HYPER["beta"],
                     seed=HYPER["seed"], data_seed=HYPER["seed"], loss_type=["sigmoid"], lr_scheduler_type="constant",
                     warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, max_length=job["max_length"],
                     precompute_ref_log_probs=True, precompute_ref_batch_size=2 * job["batch_size"],
                     gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=True, report_to="none",
                     logging_steps=1, save_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
                     # TRL 1.16 disables padding_free (it warns and pads anyway); False avoids the warning.
                     padding_free=False, **extra)
    clock.mark("start")
    tok = AutoTokenizer.from_pretrained(job["model"])
    rows = [json.loads(ln) for ln in Path(job["data"]).read_text(encoding="utf-8").splitlines() if ln.strip()]
    if variant.get("group_by_length"):
        for r in rows:  # characters track tokens closely enough to sort by, at no cost
            r["length"] = len(r["prompt"]) + max(len(r["chosen"]), len(r["rejected"]))
    ds = Dataset.from_list(rows)  # in memory: TRL's reference cache goes to a fresh temp folder per process
    trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[Hooks()])
    trainer.train()
    return {**clock.result(), "steps": len(losses), "losses": losses, "peak_rss_mib": _peak_rss_mib(),
            "trl_version": trl.__version__}


def child_matmul(job: dict) -> dict:
    """Best fp32 torch.mm rate on square matrices: the machine's practical peak for these threads."""
    _set_threads(job["threads"])
    import torch

    best = 0.0
    for n in (1024, 2048):
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.mm(a, b)
        for _ in range(job.get("reps", 6)):
            t0 = time.perf_counter()
            torch.mm(a, b)
            best = max(best, 2 * n ** 3 / (time.perf_counter() - t0))
    return {"flops": best}


CHILDREN = {"preftune": child_preftune, "trl": child_trl, "matmul": child_matmul}


def child_main(kind: str, job_file: str) -> None:
    job = json.loads(Path(job_file).read_text())
    result = CHILDREN[kind](job)
    Path(job["result_file"]).write_text(json.dumps(result))


# ----------------------------------------------------------------------------- parent

def spawn(kind: str, job: dict, workdir: Path) -> dict:
    """Run one child; its stdout/stderr go to a log file, its result comes back as JSON."""
    workdir.mkdir(parents=True, exist_ok=True)
    job = dict(job, result_file=str(workdir / "result.json"))
    (workdir / "job.json").write_text(json.dumps(job))
    env = dict(os.environ, OMP_NUM_THREADS=str(job["threads"]), MKL_NUM_THREADS=str(job["threads"]),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", TQDM_DISABLE="1",
               HF_DATASETS_CACHE=str(workdir / "hf_datasets"), TRANSFORMERS_VERBOSITY="error",
               PYTHONWARNINGS="ignore")
    with open(workdir / "log.txt", "w") as logf:
        proc = subprocess.run([sys.executable, __file__, "--child", kind, str(workdir / "job.json")],
                              stdout=logf, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        tail = (workdir / "log.txt").read_text(errors="replace")[-3000:]
        raise SystemExit(f"bench: {kind} run failed (exit {proc.returncode}); log {workdir / 'log.txt'}:\n{tail}")
    return json.loads((workdir / "result.json").read_text())


ALL_ON = dict(reference="auto", prefix_sharing=True, logits_chunk_size=1024, group_by_length=True)
# All off includes the reference: a live frozen copy run on every batch instead of the precomputed cache.
ALL_OFF = dict(reference="copy", prefix_sharing=False, logits_chunk_size=0, group_by_length=False)
TRL_VARIANTS = {
    "trl": {},                                    # precompute_ref_log_probs on, no gradient checkpointing
    "trl_grouped": {"group_by_length": True},     # + the Trainer's LengthGroupedSampler
}


def machine() -> dict:
    import torch

    cpu = platform.processor() or "?"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except OSError:
        pass
    import transformers

    try:
        import trl
        trl_version = trl.__version__
    except ImportError:
        trl_version = None
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "transformers": transformers.__version__, "trl": trl_version}


def model_spec(args) -> fixture.ModelSpec:
    return fixture.ModelSpec(vocab_size=args.vocab, hidden_size=args.hidden,
                             intermediate_size=round(args.hidden * 2.75), num_hidden_layers=args.layers)


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def job_for(fx: fixture.Fixture, name: str, args) -> dict:
    st = fx.stats[name]
    return {"model": str(fx.model_dir), "data": str(fx.data[name]), "steps": args.steps,
            "batch_size": args.batch_size, "threads": args.threads,
            # Room for every pair: nothing is truncated by either tool, so both see the same tokens.
            "max_length": st["longest_sequence"] + 8, "max_prompt_length": st["prompt_max"] + 4}


def executed_flops(tool: str, st: dict, info: dict) -> float:
    """Estimated matmul FLOPs one epoch really runs (fwd + bwd = 3 x forward), padding left out.

    Both recompute the LM head's logits in backward (8 x head instead of 6 x head per scored token).
    TRL: every token of both rows through body and head (off CUDA/XPU its fused head scores every
    position, prompt included). preftune: body over each prompt once plus both answers; head over
    answer tokens only.
    """
    body, head = info["params_body"], info["params_head"]
    if tool == "preftune":
        answers = st["tokens_unique"] - st["prompt_mean"] * st["pairs"]
        return 6 * body * st["tokens_unique"] + 8 * head * answers
    return (6 * body + 8 * head) * st["tokens_sequences"]


def summarize(runs: list[dict], st: dict, info: dict, peak: float, tool: str) -> dict:
    n = st["pairs"]
    n_matmul = info["params_body"] + info["params_head"]
    executed = executed_flops(tool, st, info)
    train = [n / r["train_s"] for r in runs]
    e2e = [n / r["end_to_end_s"] for r in runs]
    return {"runs": len(runs),
            "pairs_per_s_train": statistics.median(train),
            "pairs_per_s_e2e": statistics.median(e2e),
            "pairs_per_cpu_s_train": statistics.median(n / r["train_cpu_s"] for r in runs),
            "pairs_per_cpu_s_e2e": statistics.median(n / r["end_to_end_cpu_s"] for r in runs),
            "tokens_per_s_train": statistics.median(st["tokens_unique"] / r["train_s"] for r in runs),
            "reference_s": statistics.median(r["reference_s"] for r in runs),
            "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in runs),
            "flop_fraction": statistics.median(6 * n_matmul * st["tokens_sequences"] / r["train_s"] / peak
                                               for r in runs),
            "executed_flop_fraction": statistics.median(executed / r["train_s"] / peak for r in runs),
            "all_pairs_per_s_train": [round(x, 3) for x in train]}


def bench(args) -> dict:
    names = args.sets.split(",")
    n_pairs = args.steps * args.batch_size
    fx = fixture.build({name: n_pairs for name in names}, model=model_spec(args))
    root = Path(tempfile.mkdtemp(prefix="preftune-bench-"))
    log = print
    info = fx.model
    log(f"model: Llama {info['layers']} layers, hidden {info['hidden']}, vocab {info['vocab']}, "
        f"{info['params_total'] / 1e6:.1f}M params ({(info['params_body'] + info['params_head']) / 1e6:.1f}M in matmuls)")
    peak = spawn("matmul", {"threads": args.threads}, root / "matmul0")["flops"]
    log(f"fp32 matmul peak on {args.threads} threads: {peak / 1e9:.1f} GFLOP/s")
    trl_tools = list(TRL_VARIANTS) if args.trl_variants == "all" else [args.trl_variants]
    tools = ["preftune"] + trl_tools
    report: dict = {"machine": machine(), "threads": args.threads, "load_before": _load(), "steps": args.steps,
                    "batch_size": args.batch_size, "model": info, "sets": {}}
    for name in names:
        st = fx.stats[name]
        log(f"\n== {name}: {st['pairs']} pairs, prompt {st['prompt_mean']:.0f} / chosen {st['chosen_mean']:.0f} / "
            f"rejected {st['rejected_mean']:.0f} tokens on average; {args.steps} steps x {args.batch_size} pairs")
        base = job_for(fx, name, args)
        runs: dict[str, list[dict]] = {t: [] for t in tools}
        for r in range(args.runs):
            for tool in tools:  # alternating: p, trl, (trl_grouped,) p, trl, ...
                wd = root / name / f"{tool}-{r}"
                if tool == "preftune":
                    res = spawn("preftune", dict(base, out=str(wd / "run"), preftune_options=ALL_ON), wd)
                else:
                    res = spawn("trl", dict(base, out=str(wd / "run"), trl_variant=TRL_VARIANTS[tool]), wd)
                runs[tool].append(res)
                log(f"  run {r + 1} {tool:12s} train {st['pairs'] / res['train_s']:6.2f} pairs/s "
                    f"({st['pairs'] / res['train_cpu_s']:5.2f}/CPU-s), end-to-end {st['pairs'] / res['end_to_end_s']:6.2f} "
                    f"pairs/s, reference {res['reference_s']:5.1f}s, peak RSS {res['peak_rss_mib']:6.0f} MiB")
        summ = {t: summarize(runs[t], st, info, peak, t) for t in tools}
        best_trl = max(trl_tools, key=lambda t: summ[t]["pairs_per_s_train"])
        p, q = summ["preftune"], summ[best_trl]
        ratios = {"trl_config": best_trl,
                  "pairs_per_s_train": p["pairs_per_s_train"] / q["pairs_per_s_train"],
                  "pairs_per_s_e2e": p["pairs_per_s_e2e"] / q["pairs_per_s_e2e"],
                  "pairs_per_cpu_s_train": p["pairs_per_cpu_s_train"] / q["pairs_per_cpu_s_train"],
                  "pairs_per_cpu_s_e2e": p["pairs_per_cpu_s_e2e"] / q["pairs_per_cpu_s_e2e"],
                  "peak_rss": p["peak_rss_mib"] / q["peak_rss_mib"]}
        report["sets"][name] = {"stats": st, "tools": summ, "ratios": ratios,
                                "trl_version": runs[trl_tools[0]][0].get("trl_version")}
    peak2 = spawn("matmul", {"threads": args.threads}, root / "matmul1")["flops"]
    if not args.keep_runs:
        shutil.rmtree(root, ignore_errors=True)
    report["matmul_peak_flops"] = max(peak, peak2)
    report["load_after"] = _load()
    if peak2 > peak:  # a busier machine at the start would otherwise inflate every fraction
        for name in names:
            for s in report["sets"][name]["tools"].values():
                s["flop_fraction"] *= peak / peak2
                s["executed_flop_fraction"] *= peak / peak2
    return report


def print_report(rep: dict) -> None:
    m = rep["machine"]
    print(f"\nmachine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, transformers {m['transformers']}, "
          f"TRL {m['trl']}, {rep['threads']} threads per run; "
          f"fp32 matmul peak {rep['matmul_peak_flops'] / 1e9:.1f} GFLOP/s")
    print(f"load average (1, 5, 15 min) {rep['load_before']} before, {rep['load_after']} after: above "
          f"{m['cores']}, other jobs share the CPUs and single timings are noisy")
    hdr = (f"{'set':15s} {'tool':12s} {'pairs/s train':>13s} {'pairs/s e2e':>11s} {'pairs/CPU-s':>11s} "
           f"{'tokens/s':>9s} {'ref s':>6s} {'peak RSS MiB':>12s} {'FLOP frac':>9s} {'executed':>8s}")
    print(hdr)
    for name, s in rep["sets"].items():
        for tool, v in s["tools"].items():
            print(f"{name:15s} {tool:12s} {v['pairs_per_s_train']:13.2f} {v['pairs_per_s_e2e']:11.2f} "
                  f"{v['pairs_per_cpu_s_train']:11.2f} {v['tokens_per_s_train']:9.0f} {v['reference_s']:6.1f} "
                  f"{v['peak_rss_mib']:12.0f} {v['flop_fraction']:9.3f} {v['executed_flop_fraction']:8.3f}")
    print()
    for name, s in rep["sets"].items():
        r = s["ratios"]
        print(f"{name:15s} preftune / {r['trl_config']}: train pairs/s x{r['pairs_per_s_train']:.2f}, "
              f"end-to-end x{r['pairs_per_s_e2e']:.2f}, train per CPU-s x{r['pairs_per_cpu_s_train']:.2f}, "
              f"peak RSS x{r['peak_rss']:.2f}")


def check_exact(args) -> dict:
    """preftune with every optimization on vs every one off: per-step losses over 20 fp32 steps.

    Every step is full-batch (8 prompt-heavy pairs = the whole set, as 2 micro-batches of 4), so a step's
    loss does not depend on the pair order; group_by_length (which reorders the pairs and so changes the
    micro-batches' membership and padding) is then comparable step by step too, and the two runs must
    agree up to float rounding.
    """
    name = "prompt_heavy"
    fx = fixture.build({name: 8}, model=model_spec(args))
    base = dict(job_for(fx, name, argparse.Namespace(steps=args.exact_steps, batch_size=4, threads=args.threads)),
                grad_accum=2)
    root = Path(tempfile.mkdtemp(prefix="preftune-exact-"))
    out = {}
    for label, opts in (("all_on", ALL_ON), ("all_off", ALL_OFF)):
        res = spawn("preftune", dict(base, out=str(root / label / "run"), preftune_options=opts), root / label)
        out[label] = res["losses"]
        print(f"{label:8s} {json.dumps(opts)}: {res['steps']} steps in {res['train_s']:.1f}s, "
              f"loss {res['losses'][0]:.6f} -> {res['losses'][-1]:.6f}")
    diffs = [abs(a - b) for a, b in zip(out["all_on"], out["all_off"])]
    worst = max(diffs)
    if not args.keep_runs:
        shutil.rmtree(root, ignore_errors=True)
    # metrics.jsonl keeps 6 decimals, so 0 here means "below 5e-7".
    print(f"max |loss(all on) - loss(all off)| over {len(diffs)} steps: {worst:.2e} "
          f"({'PASS' if worst < 1e-3 else 'FAIL'}: must be < 1e-3)")
    return {"steps": len(diffs), "max_abs_diff": worst, "losses": out, "pass": worst < 1e-3}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sets", default="prompt_heavy,response_heavy")
    ap.add_argument("--runs", type=int, default=3, help="alternating runs per tool (medians are reported)")
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps per run (one epoch of steps x batch pairs)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="torch threads in every run")
    ap.add_argument("--vocab", type=int, default=fixture.ModelSpec.vocab_size, help="fixture model vocabulary")
    ap.add_argument("--hidden", type=int, default=fixture.ModelSpec.hidden_size, help="fixture model width")
    ap.add_argument("--layers", type=int, default=fixture.ModelSpec.num_hidden_layers, help="fixture model depth")
    ap.add_argument("--trl-variants", default="trl", choices=["all", *TRL_VARIANTS],
                    help="TRL configurations to run ('all': each in the alternation; ratios use the fastest)")
    ap.add_argument("--check-exact", action="store_true", help="only the exactness check (all on vs all off)")
    ap.add_argument("--exact-steps", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="1 run, 2 steps: a smoke test of the harness")
    ap.add_argument("--keep-runs", action="store_true", help="keep each run's folder and log (in /tmp)")
    ap.add_argument("--json", default=str(RESULTS / "latest.json"), help="where to write the full results")
    ap.add_argument("--child", nargs=2, metavar=("KIND", "JOB"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child_main(*args.child)
        return 0
    if args.quick:
        args.runs, args.steps = 1, 2
    t0 = time.perf_counter()
    if args.check_exact:
        rep = {"check_exact": check_exact(args), "machine": machine()}
    else:
        rep = bench(args)
        print_report(rep)
    rep["wall_s"] = time.perf_counter() - t0
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(rep, indent=1))
    print(f"\nwall time {rep['wall_s']:.0f}s; full results in {args.json}")
    return 0 if not args.check_exact or rep["check_exact"]["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
