"""The benchmark's child processes: one preftune run, one TRL run, a matmul peak, a busy loop.

Each runs in its own process (`run.py --child KIND JOB`), so peak RSS / GPU memory are per run and nothing
is shared or cached between runs. Clocks: `start` just before the tool's training call (model loading
excluded, as both load the same weights: preftune's "model" phase, which also checks the vocabulary and picks
the forward path, TRL's load before the clock starts), `train_begin` at the first step, a stamp at every
optimizer step's end (CUDA-synchronised on a GPU), `end` = the last step; `reference` is preftune's
"reference" phase (the precomputed pass and its cache file) and TRL's `_precompute_ref_logps`. preftune's
phases come from its callback events (on_phase_start/on_phase_end), nothing of preftune is replaced. The
parent adds the whole process's wall time (imports, loading, tokenization, reference pass, steps, final save).
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

HYPER = dict(learning_rate=1e-5, beta=0.1, seed=0)


def set_threads(threads: str | int) -> None:
    """'auto': leave each tool's own policy (torch default for TRL, preftune's governor); N: pin N."""
    import torch

    if str(threads) != "auto":
        torch.set_num_threads(int(threads))
        torch.set_num_interop_threads(1)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class Clock:
    """Wall and CPU seconds at named moments, and the end of every optimizer step."""

    def __init__(self, cuda: bool = False) -> None:
        self.marks: dict[str, tuple[float, float]] = {}
        self.steps: list[float] = []
        self.excluded = [0.0, 0.0]
        self.cuda = cuda

    def now(self) -> tuple[float, float]:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        return time.perf_counter(), time.process_time()

    def mark(self, name: str) -> None:
        if name not in self.marks:
            self.marks[name] = self.now()

    def step(self) -> None:
        w, c = self.now()
        self.steps.append(w)
        self.marks["end"] = (w, c)

    def add(self, seconds: float, cpu: float, key: str | None = None) -> None:
        """A span excluded from the totals (model loading), or summed under `key`."""
        if key is None:
            self.excluded[0] += seconds
            self.excluded[1] += cpu
        else:
            w, c = self.marks.get(key, (0.0, 0.0))
            self.marks[key] = (w + seconds, c + cpu)

    def timed(self, fn, key: str | None = None):
        """Wrap `fn` (TRL's, here) so its duration is excluded, or summed under `key` (see `add`)."""
        def wrapper(*a, **k):
            w0, c0 = time.perf_counter(), time.process_time()
            try:
                return fn(*a, **k)
            finally:
                self.add(time.perf_counter() - w0, time.process_time() - c0, key)
        return wrapper

    def result(self) -> dict:
        (w0, c0), (w1, c1), (ws, cs) = self.marks["train_begin"], self.marks["end"], self.marks["start"]
        step_s = [b - a for a, b in zip([w0] + self.steps, self.steps)]
        ref_w, ref_c = self.marks.get("reference", (0.0, 0.0))
        return {"train_s": w1 - w0, "train_cpu_s": c1 - c0, "end_to_end_s": w1 - ws - self.excluded[0],
                "end_to_end_cpu_s": c1 - cs - self.excluded[1], "reference_s": ref_w, "reference_cpu_s": ref_c,
                "step_s": step_s}


def _gpu_peak() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {}
    return {"peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30, "gpu": torch.cuda.get_device_name()}


def _preftune_hooks(clock: Clock):
    """preftune.train with a callback that times the setup phases (model loading excluded, the reference pass
    kept), and marks the first step's start and every step's end."""
    import preftune
    from preftune.callbacks import Callback

    class Timer(Callback):
        cpu = 0.0

        def on_phase_start(self, state, name: str) -> None:
            self.cpu = time.process_time()

        def on_phase_end(self, state, name: str, seconds: float) -> None:
            if name in ("model", "reference"):
                clock.add(seconds, time.process_time() - self.cpu, None if name == "model" else "reference")

        def on_train_begin(self, state) -> None:
            clock.mark("train_begin")

        def on_step_end(self, state) -> None:
            clock.step()

    return lambda cfg: preftune.train(cfg, callbacks=[Timer()])


def child_preftune(job: dict) -> dict:
    set_threads(job["threads"])
    # Import up front what train() imports lazily: the TRL run has its imports done before its clock starts.
    import accelerate  # noqa: F401
    import torch
    import tqdm.auto  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    import preftune.data.load  # noqa: F401
    import preftune.recipe  # noqa: F401
    from preftune import TrainConfig
    from preftune.outputs.metrics import read_metrics

    cuda = job.get("device") == "cuda"
    clock = Clock(cuda=cuda)
    run = _preftune_hooks(clock)
    cfg = TrainConfig(model=job["model"], data=job["data"], output_dir=job["out"], max_steps=job["steps"],
                      batch_size=job["batch_size"], loss="sigmoid", max_length=job["max_length"],
                      max_prompt_length=job["max_prompt_length"], progress=False, overwrite=True,
                      logging_steps=1, warmup_ratio=0.0, lr_scheduler="constant", dtype="float32",
                      mixed_precision="bf16" if cuda else "no",
                      gradient_accumulation_steps=job.get("grad_accum", 1), **{**HYPER, **job.get("hyper", {})},
                      **job.get("preftune_options", {}))
    clock.mark("start")
    run(cfg)
    rows = [r for r in read_metrics(job["out"]) if r["split"] == "train"]
    return {**clock.result(), "steps": len(rows), "losses": [r["loss"] for r in rows],
            "peak_rss_mib": peak_rss_mib(), "threads_at_end": torch.get_num_threads(), **_gpu_peak()}


def child_trl(job: dict) -> dict:
    """One TRL DPOTrainer run; the model is loaded before the clock starts, as preftune's load is excluded."""
    set_threads(job["threads"])
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    cuda = job.get("device") == "cuda"
    variant = job["trl_variant"]
    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32)
    if cuda:
        model.to("cuda")
    clock = Clock(cuda=cuda)
    losses: list[float] = []

    class Hooks(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            clock.mark("train_begin")

        def on_step_end(self, args, state, control, **kw):
            clock.step()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    DPOTrainer._precompute_ref_logps = clock.timed(DPOTrainer._precompute_ref_logps, key="reference")
    extra = dict(variant.get("config", {}))
    if not cuda:
        # TRL's fastest CPU configuration (BENCHMARKS.md): no checkpointing, fp32; padding_free is disabled in
        # TRL 1.16 (it warns and pads anyway), so False avoids the warning.
        extra = {"gradient_checkpointing": False, "bf16": False, "fp16": False, "use_cpu": True,
                 "padding_free": False, **extra}
    if variant.get("group_by_length"):
        # The Trainer's LengthGroupedSampler reads a `length` column; the unused-column filter runs before
        # the sampler is built, so it must be off (the collator ignores the extra columns).
        extra.update(train_sampling_strategy="group_by_length", remove_unused_columns=False)
    args = DPOConfig(output_dir=job["out"], per_device_train_batch_size=job["batch_size"], max_steps=job["steps"],
                     gradient_accumulation_steps=1, learning_rate=HYPER["learning_rate"], beta=HYPER["beta"],
                     seed=HYPER["seed"], data_seed=HYPER["seed"], loss_type=["sigmoid"], lr_scheduler_type="constant",
                     warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, max_length=job["max_length"],
                     precompute_ref_log_probs=True, precompute_ref_batch_size=2 * job["batch_size"],
                     report_to="none", logging_steps=1, save_strategy="no", disable_tqdm=True,
                     dataloader_num_workers=0, **extra)
    clock.mark("start")
    tok = AutoTokenizer.from_pretrained(job["model"])
    rows = [json.loads(ln) for ln in Path(job["data"]).read_text(encoding="utf-8").splitlines() if ln.strip()]
    if variant.get("group_by_length"):
        for r in rows:  # characters track tokens closely enough to sort by, at no cost
            r["length"] = len(r["prompt"]) + max(len(r["chosen"]), len(r["rejected"]))
    ds = Dataset.from_list(rows)  # in memory: TRL's reference cache goes to a fresh temp folder per process
    trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[Hooks()])
    trainer.train()
    settings = {k: getattr(args, k) for k in ("gradient_checkpointing", "bf16", "padding_free", "use_liger_kernel")
                if hasattr(args, k)}
    return {**clock.result(), "steps": len(losses), "losses": losses, "peak_rss_mib": peak_rss_mib(),
            "trl_version": trl.__version__, "trl_settings": settings, "threads_at_end": torch.get_num_threads(),
            **_gpu_peak()}


def child_matmul(job: dict) -> dict:
    """Best torch.mm rate on square matrices: fp32 on CPU, bf16 on a GPU (the MFU denominator)."""
    set_threads(job["threads"])
    import torch

    cuda = job.get("device") == "cuda"
    dtype, dev = (torch.bfloat16, "cuda") if cuda else (torch.float32, "cpu")
    best = 0.0
    for n in ((4096, 8192) if cuda else (1024, 2048)):
        a, b = torch.randn(n, n, dtype=dtype, device=dev), torch.randn(n, n, dtype=dtype, device=dev)
        torch.mm(a, b)
        for _ in range(job.get("reps", 6)):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(10 if cuda else 1):
                torch.mm(a, b)
            if cuda:
                torch.cuda.synchronize()
            best = max(best, (10 if cuda else 1) * 2 * n ** 3 / (time.perf_counter() - t0))
    return {"flops": best, "dtype": str(dtype)}


def busy_loop() -> None:
    """One core's worth of load: another user's CPU-bound process."""
    x = 0
    while True:
        x = (x + 1) % 1000003


CHILDREN = {"preftune": child_preftune, "trl": child_trl, "matmul": child_matmul}


def child_main(kind: str, job_file: str) -> None:
    if kind == "busy":
        busy_loop()
    job = json.loads(Path(job_file).read_text())
    result = CHILDREN[kind](job)
    Path(job["result_file"]).write_text(json.dumps(result))
