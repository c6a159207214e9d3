"""preftune vs TRL's DPOTrainer: same model, data, batch, hyperparameters and precision; one process per run.

    python bench/run.py                                  # CPU: fixture model, both sets, 3 alternating runs
    python bench/run.py --busy 0,2                       # also with 2 busy processes beside every run
    python bench/run.py --threads 1                      # pin one torch thread in every run (default: each
                                                         # tool's own choice, as a user would run it)
    python bench/run.py --baseline-src /path/to/old/tree # also an older preftune checkout, same alternation
    python bench/run.py --check-exact                    # CPU: preftune all optimizations on vs all off, 20 steps
    python bench/run.py --quick                          # 1 run of 2 steps: a smoke test
    python bench/run.py --device cuda --presets qwen05,llama1b   # GPU: real models' shapes (bench/gpu_run.sh)

Method (BENCHMARKS.md has the figures):
- Each run is its own subprocess (children.py), so peak RSS / GPU memory are per run; runs alternate
  (preftune, trl, preftune, trl, ...) so a slow spell of this shared machine hits every tool.
- Both tools train on the same S x B pairs (S steps of B pairs), AdamW, constant LR, beta 0.1, sigmoid loss,
  max_length large enough that nothing is truncated, reference log-probs precomputed before training.
  CPU: fp32, TRL in its fastest CPU configuration (no gradient checkpointing, fp32). CUDA: fp32 weights with
  bf16 autocast; TRL default (gradient checkpointing on, bf16) and TRL with checkpointing off.
- CPU figures: "train" = pairs / wall time of all S steps; "end-to-end" from the loaded model to the last
  step (tokenization, reference pass, steps); "whole process" = the child's whole wall time (imports, model
  loading, tokenization, reference pass, steps, final save). CUDA: steady-state pairs/s = B / median step
  time over steps 6..S (CUDA-synchronised), peak torch.cuda.max_memory_allocated, MFU.
- FLOPs: 6 x N x T with N the matmul parameters and T the tokens of the prompt+chosen and prompt+rejected rows
  (the work of a standard DPO step, the same numerator for every tool; attention scores left out). On CPU as a
  fraction of a measured fp32 torch.mm peak; on CUDA (MFU) of a measured bf16 torch.mm peak on the same GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import children  # noqa: E402
import fixture  # noqa: E402
import report  # noqa: E402

RESULTS = HERE / "results"

# preftune's product defaults, spelled out; "all off" includes the reference (a live frozen copy).
ALL_ON = dict(reference="auto", prefix_sharing="auto", logits_chunk_size="auto", group_by_length=True)
ALL_OFF = dict(reference="copy", prefix_sharing="off", logits_chunk_size=0, group_by_length=False)
CPU_TOOLS = {
    "preftune": {"kind": "preftune", "preftune_options": {}},  # the product's defaults, whatever the tree
    "trl": {"kind": "trl", "trl_variant": {}},
    "trl_grouped": {"kind": "trl", "trl_variant": {"group_by_length": True}},
}
CUDA_TOOLS = {
    "preftune": {"kind": "preftune", "preftune_options": {}},
    "preftune_ckpt": {"kind": "preftune", "preftune_options": {"gradient_checkpointing": True}},
    "preftune_plain": {"kind": "preftune", "preftune_options": {"prefix_sharing": "off", "logits_chunk_size": 0}},
    # packed, one pair per row under a dense 4D mask (sdpa's memory-efficient kernel) instead of FlexAttention
    "preftune_sdpa": {"kind": "preftune", "preftune_options": {"attn_implementation": "sdpa"}},
    "preftune_cache": {"kind": "preftune", "preftune_options": {"prefix_sharing": "cache"}},
    "trl": {"kind": "trl", "trl_variant": {}},  # TRL's defaults: gradient checkpointing on, bf16
    "trl_nockpt": {"kind": "trl", "trl_variant": {"config": {"gradient_checkpointing": False}}},
}


# ----------------------------------------------------------------------------- running children

def _env(job: dict, workdir: Path, src: str | None) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               TQDM_DISABLE="1", HF_DATASETS_CACHE=str(workdir / "hf_datasets"), TRANSFORMERS_VERBOSITY="error",
               PYTHONWARNINGS="ignore")
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.pop(k, None)
    if str(job.get("threads", "auto")) != "auto":
        env.update(OMP_NUM_THREADS=str(job["threads"]), MKL_NUM_THREADS=str(job["threads"]))
    if src:
        env["PYTHONPATH"] = os.pathsep.join([src] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def spawn(kind: str, job: dict, workdir: Path, busy: int = 0, src: str | None = None) -> dict:
    """Run one child (with `busy` CPU-bound processes beside it); its log goes to a file, its result back
    as JSON, plus the whole process's wall time and the preftune run's `speed:` line."""
    workdir.mkdir(parents=True, exist_ok=True)
    job = dict(job, result_file=str(workdir / "result.json"))
    (workdir / "job.json").write_text(json.dumps(job))
    hogs = [subprocess.Popen([sys.executable, __file__, "--child", "busy", "-"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL) for _ in range(busy)]
    try:
        t0 = time.perf_counter()
        with open(workdir / "log.txt", "w") as logf:
            proc = subprocess.run([sys.executable, __file__, "--child", kind, str(workdir / "job.json")],
                                  stdout=logf, stderr=subprocess.STDOUT, env=_env(job, workdir, src))
        process_s = time.perf_counter() - t0
    finally:
        for h in hogs:  # only the processes this function started
            h.kill()
            h.wait()
    log_text = (workdir / "log.txt").read_text(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} run failed (exit {proc.returncode}); log {workdir / 'log.txt'}:\n{log_text[-3000:]}")
    speed = [ln for ln in log_text.splitlines() if ln.startswith("speed: ")]
    return {**json.loads((workdir / "result.json").read_text()), "process_s": process_s,
            "speed_line": speed[0] if speed else None}


def machine(device: str) -> dict:
    import torch
    import transformers

    cpu = platform.processor() or "?"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except OSError:
        pass
    try:
        import trl
        trl_version = trl.__version__
    except ImportError:
        trl_version = None
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "transformers": transformers.__version__, "trl": trl_version}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def load_avg() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def job_for(fx: fixture.Fixture, name: str, args) -> dict:
    st = fx.stats[name]
    return {"model": str(fx.model_dir), "data": str(fx.data[name]), "steps": args.steps, "device": args.device,
            "batch_size": args.batch_size, "threads": args.threads,
            # Room for every pair: nothing is truncated by either tool, so both see the same tokens.
            "max_length": st["longest_sequence"] + 8, "max_prompt_length": st["prompt_max"] + 4}


def run_tool(tool: str, spec: dict, base: dict, wd: Path, busy: int = 0, src: str | None = None) -> dict:
    job = dict(base, out=str(wd / "run"))
    if spec["kind"] == "preftune":
        job["preftune_options"] = spec["preftune_options"]
    else:
        job["trl_variant"] = spec["trl_variant"]
    return spawn(spec["kind"], job, wd, busy=busy, src=src)


# ----------------------------------------------------------------------------- CPU

def bench_cpu(args) -> dict:
    names = args.sets.split(",")
    busy_levels = [int(b) for b in str(args.busy).split(",")]
    fx = fixture.build({name: args.steps * args.batch_size for name in names}, model=model_spec(args))
    root = Path(tempfile.mkdtemp(prefix="preftune-bench-"))
    info = fx.model
    print(f"model: {info['model_type']} {info['layers']} layers, hidden {info['hidden']}, vocab {info['vocab']}, "
          f"{info['params_total'] / 1e6:.1f}M params ({(info['params_body'] + info['params_head']) / 1e6:.1f}M "
          "in matmuls)")
    peak = spawn("matmul", {"threads": args.threads}, root / "matmul0")["flops"]
    print(f"fp32 matmul peak ({args.threads} threads): {peak / 1e9:.1f} GFLOP/s")
    tools = {"preftune": CPU_TOOLS["preftune"]}
    if args.baseline_src:
        tools["preftune_base"] = dict(CPU_TOOLS["preftune"], src=args.baseline_src)
    trl_tools = {"all": [t for t in CPU_TOOLS if t.startswith("trl")], "none": []}.get(args.trl_variants,
                                                                                   [args.trl_variants])
    tools.update({t: CPU_TOOLS[t] for t in trl_tools})
    rep: dict = {"device": "cpu", "machine": machine("cpu"), "threads": args.threads, "load_before": load_avg(),
                 "steps": args.steps, "batch_size": args.batch_size, "model": info, "busy_levels": busy_levels,
                 "sets": {}, "loads": []}
    for name in names:
        st = fx.stats[name]
        print(f"\n== {name}: {st['pairs']} pairs, prompt {st['prompt_mean']:.0f} / chosen {st['chosen_mean']:.0f} / "
              f"rejected {st['rejected_mean']:.0f} tokens; {args.steps} steps x {args.batch_size} pairs")
        base = job_for(fx, name, args)
        runs: dict = {f"{t}@{b}": [] for b in busy_levels for t in tools}
        for r in range(args.runs):
            for b in busy_levels:
                for tool, spec in tools.items():  # alternating: p, trl, p, trl, ...
                    res = run_tool(tool, spec, base, root / name / f"{tool}-{b}-{r}", busy=b, src=spec.get("src"))
                    rep["loads"].append(os.getloadavg()[0])
                    runs[f"{tool}@{b}"].append(res)
                    print(f"  run {r + 1} busy {b} {tool:14s} train {st['pairs'] / res['train_s']:6.2f} pairs/s, "
                          f"end-to-end {st['pairs'] / res['end_to_end_s']:5.2f}, whole process "
                          f"{res['process_s']:5.1f}s, peak RSS {res['peak_rss_mib']:5.0f} MiB, "
                          f"threads {res.get('threads_at_end')}", flush=True)
        summ = {key: report.summarize_cpu(v, st, info, peak, key.split("@")[0]) for key, v in runs.items()}
        rep["sets"][name] = {"stats": st, "tools": summ, "ratios": report.cpu_ratios(summ, trl_tools, busy_levels),
                             "runs": {k: [{kk: vv for kk, vv in r.items() if kk != "step_s"} for r in v]
                                      for k, v in runs.items()}}
    peak2 = spawn("matmul", {"threads": args.threads}, root / "matmul1")["flops"]
    rep["matmul_peak_flops"] = max(peak, peak2)
    rep["load_after"] = load_avg()
    if not args.keep_runs:
        shutil.rmtree(root, ignore_errors=True)
    return rep


def model_spec(args) -> fixture.ModelSpec:
    return fixture.ModelSpec(vocab_size=args.vocab, hidden_size=args.hidden,
                             intermediate_size=round(args.hidden * 2.75), num_hidden_layers=args.layers)


def check_exact(args) -> dict:
    """preftune with every optimization on vs every one off: per-step losses over 20 fp32 steps.

    Every step is full-batch (8 prompt-heavy pairs = the whole set, as 2 micro-batches of 4), so a step's
    loss does not depend on the pair order and the two runs must agree up to float rounding.
    """
    name = "prompt_heavy"
    fx = fixture.build({name: 8}, model=model_spec(args))
    ns = argparse.Namespace(steps=args.exact_steps, batch_size=4, threads=args.threads, device="cpu")
    base = dict(job_for(fx, name, ns), grad_accum=2)
    root = Path(tempfile.mkdtemp(prefix="preftune-exact-"))
    out = {}
    for label, opts in (("all_on", ALL_ON), ("all_off", ALL_OFF)):
        res = spawn("preftune", dict(base, out=str(root / label / "run"), preftune_options=opts), root / label)
        out[label] = res["losses"]
        print(f"{label:8s} {json.dumps(opts)}: {res['steps']} steps in {res['train_s']:.1f}s, "
              f"loss {res['losses'][0]:.6f} -> {res['losses'][-1]:.6f}; {res['speed_line']}")
    diffs = [abs(a - b) for a, b in zip(out["all_on"], out["all_off"])]
    worst = max(diffs)
    if not args.keep_runs:
        shutil.rmtree(root, ignore_errors=True)
    print(f"max |loss(all on) - loss(all off)| over {len(diffs)} steps: {worst:.2e} "
          f"({'PASS' if worst < 1e-3 else 'FAIL'}: must be < 1e-3)")
    return {"steps": len(diffs), "max_abs_diff": worst, "losses": out, "pass": worst < 1e-3}


# ----------------------------------------------------------------------------- CUDA

def bench_cuda(args) -> dict:
    """Every (preset, set) pair, tools alternating, under a wall-clock budget: runs are skipped (and listed)
    once the budget is spent, so a device session always gets its results back."""
    deadline = time.perf_counter() + args.budget_s
    names = args.sets.split(",")
    tools = args.tools.split(",")
    dev = "cpu" if args.gpu_flow_on_cpu else "cuda"  # on CPU: a smoke test of this harness (preset tiny)
    root = Path(tempfile.mkdtemp(prefix="preftune-gpu-"))
    peak = spawn("matmul", {"threads": "auto", "device": dev}, root / "matmul")["flops"]
    print(f"matmul peak: {peak / 1e12:.3f} TFLOP/s", flush=True)
    rep: dict = {"device": "cuda", "machine": machine(dev), "matmul_peak_flops": peak, "steps": args.steps,
                 "batch_size": args.batch_size, "presets": {}, "skipped": [], "errors": []}
    for preset in args.presets.split(","):
        spec = fixture.PRESETS[preset]
        fx = fixture.build({n: args.steps * args.batch_size for n in names}, model=spec, sets=fixture.GPU_SETS,
                           root=Path(args.fixture_dir), device=dev)
        rep["presets"][preset] = {"model": fx.model, "sets": {}}
        for name in names:
            base = dict(job_for(fx, name, args), device=dev)
            st = fx.stats[name]
            runs: dict = {t: [] for t in tools}
            order = list(tools)
            if preset == args.presets.split(",")[0] and name == names[0]:
                # Once per invocation: the layout without FlexAttention, and (--exact) the plain path's
                # bf16 losses to compare step by step with the default's.
                order += [t for t in args.extra_first.split(",") if t] + (["preftune_plain"] if args.exact else [])
                runs.update({t: [] for t in order if t not in runs})
            for r in range(args.runs):
                for tool in order if r % 2 == 0 else order[::-1]:
                    if time.perf_counter() > deadline:
                        rep["skipped"].append(f"{preset}/{name}/{tool}/{r}")
                        continue
                    try:
                        res = run_tool(tool, CUDA_TOOLS[tool], base, root / preset / name / f"{tool}-{r}")
                    except RuntimeError as e:
                        rep["errors"].append({"run": f"{preset}/{name}/{tool}/{r}", "error": str(e)[-2000:]})
                        print(f"  {preset} {name} {tool}: FAILED\n{str(e)[-1500:]}", flush=True)
                        continue
                    runs[tool].append({k: v for k, v in res.items()})
                    s = report.steady(res, args.batch_size)
                    print(f"  {preset} {name} run {r + 1} {tool:14s} {s:7.2f} pairs/s steady, peak "
                          f"{res.get('peak_gpu_gib', 0):6.2f} GiB, whole process {res['process_s']:5.1f}s, "
                          f"loss {res['losses'][0]:.4f} -> {res['losses'][-1]:.4f}  {res.get('speed_line') or ''}",
                          flush=True)
            rep["presets"][preset]["sets"][name] = {
                "stats": st, "runs": runs, "tools": {t: report.summarize_cuda(v, st, fx.model, peak, args.batch_size)
                                                     for t, v in runs.items() if v}}
            Path(args.json).write_text(json.dumps(rep, indent=1))  # partial results survive a timeout
    if not args.keep_runs:
        shutil.rmtree(root, ignore_errors=True)
    return rep


# ----------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--sets", default="prompt_heavy,response_heavy")
    ap.add_argument("--runs", type=int, default=None, help="alternating runs per tool (CPU 3, CUDA 1)")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per run (CPU 4, CUDA 20)")
    ap.add_argument("--batch-size", type=int, default=None, help="pairs per step (CPU 4, CUDA 8)")
    ap.add_argument("--threads", default="auto", help="torch threads per run: auto (each tool's own) or a number")
    ap.add_argument("--busy", default="0", help="busy processes beside each run, e.g. 0,2 for both conditions")
    ap.add_argument("--baseline-src", help="also run the preftune package found in this folder (an older tree)")
    ap.add_argument("--vocab", type=int, default=fixture.ModelSpec.vocab_size, help="CPU fixture model vocabulary")
    ap.add_argument("--hidden", type=int, default=fixture.ModelSpec.hidden_size, help="CPU fixture model width")
    ap.add_argument("--layers", type=int, default=fixture.ModelSpec.num_hidden_layers, help="CPU fixture depth")
    ap.add_argument("--trl-variants", default="trl", choices=["all", "none", "trl", "trl_grouped"],
                    help="CPU: TRL configurations to run (ratios use the fastest)")
    ap.add_argument("--presets", default="qwen05,llama1b", help="CUDA: model shapes (fixture.PRESETS)")
    ap.add_argument("--tools", default="preftune,trl,preftune_ckpt,trl_nockpt", help="CUDA: tools to alternate")
    ap.add_argument("--extra-first", default="preftune_sdpa", help="CUDA: tools run on the first model/set only")
    ap.add_argument("--exact", action="store_true", help="CUDA: also preftune's plain path on the first preset/set")
    ap.add_argument("--budget-s", type=float, default=1e9, help="CUDA: start no run after this many seconds")
    ap.add_argument("--fixture-dir", default=str(fixture.ROOT))
    ap.add_argument("--gpu-flow-on-cpu", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--check-exact", action="store_true", help="CPU: only the exactness check (all on vs all off)")
    ap.add_argument("--exact-steps", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="1 run, 2 steps: a smoke test of the harness")
    ap.add_argument("--keep-runs", action="store_true", help="keep each run's folder and log (in /tmp)")
    ap.add_argument("--json", default=str(RESULTS / "latest.json"), help="where to write the full results")
    ap.add_argument("--markdown", help="also write the results as markdown tables here")
    ap.add_argument("--child", nargs=2, metavar=("KIND", "JOB"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        children.child_main(*args.child)
        return 0
    cuda = args.device == "cuda"
    args.runs = args.runs or (1 if cuda else 3)
    args.steps = args.steps or (20 if cuda else 4)
    args.batch_size = args.batch_size or (8 if cuda else 4)
    if args.quick:
        args.runs, args.steps = 1, 2
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if args.check_exact:
        rep = {"check_exact": check_exact(args), "machine": machine("cpu")}
    else:
        rep = bench_cuda(args) if cuda else bench_cpu(args)
        rep["command"] = " ".join(["python bench/run.py"] + (argv if argv is not None else sys.argv[1:]))
        text = report.markdown(rep)
        print("\n" + text)
        if args.markdown:
            Path(args.markdown).write_text(text)
    rep["wall_s"] = time.perf_counter() - t0
    Path(args.json).write_text(json.dumps(rep, indent=1))
    print(f"\nwall time {rep['wall_s']:.0f}s; full results in {args.json}")
    return 0 if not args.check_exact or rep["check_exact"]["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
