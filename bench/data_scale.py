"""Data at scale: time and peak memory to get 10k / 100k / 1M preference pairs ready to train, and a 2-step run.

    .venv/bin/python bench/data_scale.py                                  # 10k, 100k, 1M: preftune and TRL
    .venv/bin/python bench/data_scale.py --sizes 200000 --phases data,rerun,train
    .venv/bin/python bench/data_scale.py --sizes 200000 --preftune-path ../main --label before --reference copy

The data file is generated (synthetic pairs like issue 17's: prompts of 30-120 pseudo-words, chosen answers of
12 and rejected of 25, Zipf-distributed words from the benchmark fixture's lexicon) into --workdir (default
/tmp/preftune-data-scale; delete it afterwards, the 1M file is 840 MB). The model is the fixture model of
bench/fixture.py (its byte-level BPE tokenizer is what the data is tokenized with).

Every measurement is its own subprocess, so peak RSS (ru_maxrss: imports, tokenizer, model, data, everything
of that process) is per measurement, and phases report the peak so far when they end. Phases:

- data:   `load_splits` in a fresh process with an empty cache: read + validate + tokenize (+ write the cache).
- rerun:  `load_splits` again in a new process, the cache from `data` in place.
- train:  `preftune.train` with --steps optimizer steps (default reference: auto = precomputed), in a fresh
          run folder, split into the phases the run reports to its callbacks (on_phase_start/on_phase_end):
          data (tokenizer, read, validate, tokenize), model (load, checks, forward plan), reference, steps, save.
- trl:    TRL's `DPOTrainer` on the same file: `datasets.load_dataset("json")` (read) and the trainer's
          `_prepare_dataset` (prompt/EOS handling and tokenization, one example at a time through
          `Dataset.map`), the model loaded before the clock starts.

--preftune-path runs another preftune source tree (main before a change, say): its children import preftune
from there; phases that tree cannot do (no cache) are measured as they run there. Results are printed as a
Markdown table and written to bench/results/data_scale-*.json with the machine's load average.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class Phases:
    """Wall and CPU seconds of named phases, and the peak RSS when each ends."""

    def __init__(self) -> None:
        self.out: dict[str, dict] = {}

    def add(self, label: str, wall: float, cpu: float) -> None:
        prev = self.out.get(label, {"wall_s": 0.0, "cpu_s": 0.0})
        self.out[label] = {"wall_s": prev["wall_s"] + wall, "cpu_s": prev["cpu_s"] + cpu, "peak_rss_mib": _rss_mib()}

    def wrap(self, owner, name: str, label: str) -> None:
        """Time another library's function (TRL's, datasets'); preftune's phases come from its callbacks."""
        fn = getattr(owner, name)

        def timed(*a, **k):
            w, c = time.perf_counter(), time.process_time()
            try:
                return fn(*a, **k)
            finally:
                self.add(label, time.perf_counter() - w, time.process_time() - c)
        setattr(owner, name, timed)

    def callback(self):
        """A preftune callback that records the run's phases."""
        from preftune.callbacks import Callback

        phases = self

        class PhaseClock(Callback):
            cpu = 0.0

            def on_phase_start(self, state, name: str) -> None:
                self.cpu = time.process_time()

            def on_phase_end(self, state, name: str, seconds: float) -> None:
                phases.add(name, seconds, time.process_time() - self.cpu)

        return PhaseClock()


# ----------------------------------------------------------------------------------------------- generation

def generate(path: Path, n: int, seed: int = 0) -> Path:
    """`n` pairs: prompt of 30-120 words, chosen of 12, rejected of 25 (Zipf words of the fixture's lexicon)."""
    import fixture
    import numpy as np

    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    source = fixture.TextSource(seed=0)
    words = np.array(source.words, dtype=object)
    weights = np.array(source.weights) / sum(source.weights)
    rng = np.random.default_rng(seed)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for s in range(0, n, 10_000):
            m = min(10_000, n - s)
            lengths = rng.integers(30, 121, size=m)
            ids = rng.choice(len(words), size=int(lengths.sum()) + 37 * m, p=weights)
            at, lines = 0, []
            for k in range(m):
                prompt = " ".join(words[ids[at:at + lengths[k]]])
                at += lengths[k]
                chosen, rejected = " " + " ".join(words[ids[at:at + 12]]), " " + " ".join(words[ids[at + 12:at + 37]])
                at += 37
                lines.append(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}))
            f.write("\n".join(lines) + "\n")
    tmp.replace(path)
    return path


# ----------------------------------------------------------------------------------------------- children

def child_data(job: dict) -> dict:
    """load_splits once (the cache folder from the job: empty for `data`, filled for `rerun`)."""
    from transformers import AutoTokenizer

    from preftune.config import TrainConfig
    from preftune.data import splits
    from preftune.data.splits import load_splits

    tok = AutoTokenizer.from_pretrained(job["model"])
    before = _rss_mib()
    fields = TrainConfig.field_names()
    extra = {"data_cache_dir": job["cache"]} if "data_cache_dir" in fields else {}
    cfg = TrainConfig(model=job["model"], data=job["data"], output_dir=job["out"], progress=False, **extra)
    if hasattr(splits, "DataSettings"):  # load_splits takes the data settings only (before: the whole config)
        cfg = splits.DataSettings.of(cfg)
    w, c = time.perf_counter(), time.process_time()
    train, _ = load_splits(cfg, tok, "dpo")
    out = {"wall_s": time.perf_counter() - w, "cpu_s": time.process_time() - c, "pairs": len(train.pairs),
           "rss_before_mib": before, "peak_rss_mib": _rss_mib()}
    out["cached"] = "cache_dir" in inspect.signature(load_splits).parameters
    return out


def child_train(job: dict) -> dict:
    """One `preftune.train` run, its phases timed by the run's own phase events (a tree without them: none)."""
    import torch

    from preftune import TrainConfig, train

    torch.set_num_threads(job["threads"])
    phases = Phases()
    cfg = TrainConfig(model=job["model"], data=job["data"], output_dir=job["out"], max_steps=job["steps"],
                      reference=job["reference"], progress=False, batch_size=8, learning_rate=1e-5)
    w, c = time.perf_counter(), time.process_time()
    res = train(cfg, callbacks=[phases.callback()])
    return {"wall_s": time.perf_counter() - w, "cpu_s": time.process_time() - c, "steps": res.steps,
            "phases": phases.out, "peak_rss_mib": _rss_mib()}


def child_trl(job: dict) -> dict:
    """TRL's preprocessing of the same file: load_dataset("json"), then DPOTrainer(...)'s _prepare_dataset."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(job["threads"])
    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32)
    phases = Phases()
    phases.wrap(datasets, "load_dataset", "read")
    phases.wrap(DPOTrainer, "_prepare_dataset", "tokenize")
    w, c = time.perf_counter(), time.process_time()
    tok = AutoTokenizer.from_pretrained(job["model"])
    ds = datasets.load_dataset("json", data_files=job["data"], split="train")
    args = DPOConfig(output_dir=job["out"], per_device_train_batch_size=8, max_steps=job["steps"], report_to="none",
                     use_cpu=True, bf16=False, gradient_checkpointing=False, padding_free=False, save_strategy="no",
                     disable_tqdm=True, max_length=1024)
    trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    return {"wall_s": time.perf_counter() - w, "cpu_s": time.process_time() - c, "pairs": len(trainer.train_dataset),
            "phases": phases.out, "peak_rss_mib": _rss_mib()}


CHILDREN = {"data": child_data, "rerun": child_data, "train": child_train, "trl": child_trl}


def spawn(kind: str, job: dict, workdir: Path, preftune_path: Path) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    job = dict(job, result_file=str(workdir / f"{kind}.json"))
    (workdir / f"{kind}-job.json").write_text(json.dumps(job))
    env = dict(os.environ, PYTHONPATH=f"{preftune_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=str(workdir / "hf_datasets"),
               TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore", TQDM_DISABLE="1")
    load = os.getloadavg()
    with open(workdir / f"{kind}-log.txt", "w") as log:
        proc = subprocess.run([sys.executable, __file__, "--child", kind, str(workdir / f"{kind}-job.json")],
                              stdout=log, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        tail = (workdir / f"{kind}-log.txt").read_text(errors="replace")[-3000:]
        raise SystemExit(f"bench: {kind} failed (exit {proc.returncode}):\n{tail}")
    out = json.loads(Path(job["result_file"]).read_text())
    out["load_avg"] = [round(x, 2) for x in (*load, *os.getloadavg())]  # 1/5/15-min before, then after
    return out


# ----------------------------------------------------------------------------------------------- parent

def _row(size: int, what: str, r: dict) -> str:
    phases = r.get("phases", {})
    detail = ", ".join(f"{k} {v['wall_s']:.1f} s / {v['peak_rss_mib']:.0f} MiB" for k, v in phases.items())
    return (f"| {size:,} | {what} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['peak_rss_mib']:.0f} | {detail} | "
            f"{r['load_avg'][0]:.1f} |")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--phases", default="data,rerun,train,trl")
    ap.add_argument("--workdir", default="/tmp/preftune-data-scale")
    ap.add_argument("--preftune-path", default=str(HERE.parent))
    ap.add_argument("--label", default="after")
    ap.add_argument("--reference", default="auto", help="reference strategy of the train phase")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the tokenizer uses every core)")
    ap.add_argument("--trl-max-size", type=int, default=1_000_000, help="run TRL only up to this many pairs")
    args = ap.parse_args(argv)

    import fixture

    model = fixture.build({}).model_dir
    work = Path(args.workdir)
    rows, results = [], {"label": args.label, "preftune_path": args.preftune_path, "machine": platform.platform(),
                         "cpus": os.cpu_count(), "sizes": {}}
    for size in (int(s) for s in args.sizes.split(",")):
        data = generate(work / f"pairs-{size}.jsonl", size)
        run = work / f"{args.label}-{size}"
        subprocess.run(["rm", "-rf", str(run)], check=True)
        job = dict(model=str(model), data=str(data), cache=str(run / "cache"), out=str(run / "out"),
                   steps=args.steps, reference=args.reference, threads=args.threads)
        res = results["sizes"][str(size)] = {"file_mib": data.stat().st_size / 2**20}
        for phase in args.phases.split(","):
            if phase == "trl" and size > args.trl_max_size:
                continue
            if phase == "train":
                job["out"] = str(run / "train-out")
            print(f"[{args.label}] {size:,} pairs: {phase} ...", flush=True)
            res[phase] = r = spawn(phase, job, run, Path(args.preftune_path))
            what = {"train": f"preftune {args.steps}-step run (reference {args.reference})",
                    "trl": "TRL DPOTrainer preprocessing", "data": "preftune data ready, first run",
                    "rerun": "preftune data ready, rerun (cache)"}[phase]
            rows.append(_row(size, what, r))
            print(rows[-1], flush=True)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"data_scale-{args.label}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(results, indent=1))
    print("\n| pairs | what | wall s | CPU s | peak RSS MiB | phases (wall, peak RSS so far) | load avg |")
    print("|---:|---|---:|---:|---:|---|---:|")
    print("\n".join(rows))
    print(f"\nfull results: {out}")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        job = json.loads(Path(sys.argv[3]).read_text())
        Path(job["result_file"]).write_text(json.dumps(CHILDREN[sys.argv[2]](job)))
    else:
        main()
