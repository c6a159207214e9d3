"""Compare runs of scale_gpu_check.sh: metrics and final/ weights against the first run, final/ loading with plain
transformers, and the measured peak memory against `preftune plan`'s estimate.

    python bench/scale_compare.py OUT one fsdp2 zero3 ...
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from safetensors.torch import load_file

from preftune.memory_plan import OVERHEAD, Setup, estimate, load_shape

SETUPS = {  # run name → (planner setup, bf16 autocast / mixed precision)
    "one": (Setup("single", 1, False), False),
    "fsdp2": (Setup("fsdp2", 1, False, checkpointing=True), False),
    "fsdp2_bf16": (Setup("fsdp2", 1, False, checkpointing=True), True),
    "fsdp2_resumed": (Setup("fsdp2", 1, False, checkpointing=True), False),
    "zero3": (Setup("zero3", 1, False), False),
}


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def main(out: Path, names: list[str]) -> None:
    from transformers import AutoModelForCausalLM

    args = json.loads((out / "args.json").read_text())
    shape = load_shape(str(out / "model"))
    base = out / names[0]
    wa = load_file(str(base / "final" / "model.safetensors"))
    for name in names:
        run = out / name
        if not (run / "final").is_dir():
            print(f"{name:14} no final/ (failed or not run)")
            continue
        ma, mb = metrics(base), metrics(run)
        loss = max(abs(a["loss"] - b["loss"]) for a, b in zip(ma, mb))
        wb = load_file(str(run / "final" / "model.safetensors"))
        weights = max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)
        model = AutoModelForCausalLM.from_pretrained(run / "final")  # a plain transformers folder
        del model
        log = (out / f"{name}.log").read_text() if (out / f"{name}.log").is_file() else ""
        peak = re.search(r"PEAK rank 0 (\d+) MiB allocated", log)
        wrapper = re.search(r"WRAPPER rank 0 (\S+) (\S+)", log)
        line = f"{name:14} steps {[r['step'] for r in mb if r['split'] == 'train']} max |Δloss| {loss:.2e} " \
               f"max |Δweight| {weights:.2e} wrapper {wrapper.groups() if wrapper else '?'}"
        if peak and name in SETUPS:
            setup, bf16 = SETUPS[name]
            est = estimate(shape, setup, batch_size=args["batch_size"], seq_len=args["seq_len"], bf16=bf16)
            planned = (est.total - OVERHEAD) / 2**20
            line += f" peak {peak.group(1)} MiB vs plan {planned:.0f} MiB ({int(peak.group(1)) / planned:.2f}x)"
        print(line)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
