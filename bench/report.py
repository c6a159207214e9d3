"""Summaries, ratios and markdown tables of the benchmark's runs (bench/run.py writes them)."""

from __future__ import annotations

import statistics


def executed_flops(tool: str, st: dict, info: dict) -> float:
    """Estimated matmul FLOPs one CPU epoch really runs (fwd + bwd = 3 x forward), padding left out.

    TRL: every token of both rows through body and head (off CUDA its fused head scores every position,
    prompt included; 8 x head: the logits are recomputed in backward). preftune: body over each prompt
    once plus both answers; head over answer tokens only, its logits kept for backward on CPU (6 x head).
    """
    body, head = info["params_body"], info["params_head"]
    if tool.startswith("preftune"):
        answers = st["tokens_unique"] - st["prompt_mean"] * st["pairs"]
        return 6 * body * st["tokens_unique"] + 6 * head * answers
    return (6 * body + 8 * head) * st["tokens_sequences"]


def summarize_cpu(runs: list[dict], st: dict, info: dict, peak: float, tool: str) -> dict:
    n = st["pairs"]
    n_matmul = info["params_body"] + info["params_head"]
    med = statistics.median
    train = [n / r["train_s"] for r in runs]
    return {"runs": len(runs),
            "pairs_per_s_train": med(train),
            "pairs_per_s_e2e": med(n / r["end_to_end_s"] for r in runs),
            "pairs_per_s_whole": med(n / r["process_s"] for r in runs),
            "process_s": med(r["process_s"] for r in runs),
            "pairs_per_cpu_s_train": med(n / r["train_cpu_s"] for r in runs),
            "tokens_per_s_train": med(st["tokens_unique"] / r["train_s"] for r in runs),
            "reference_s": med(r["reference_s"] for r in runs),
            "peak_rss_mib": med(r["peak_rss_mib"] for r in runs),
            "flop_fraction": med(6 * n_matmul * st["tokens_sequences"] / r["train_s"] / peak for r in runs),
            "executed_flop_fraction": med(executed_flops(tool, st, info) / r["train_s"] / peak for r in runs),
            "threads_at_end": [r.get("threads_at_end") for r in runs],
            "speed_line": runs[0].get("speed_line"),
            "all_pairs_per_s_train": [round(x, 3) for x in train],
            "all_process_s": [round(r["process_s"], 2) for r in runs]}


def cpu_ratios(summ: dict, trl_tools: list[str], busy_levels: list[int]) -> dict:
    """preftune / the fastest TRL configuration at each load; each tool's slowdown under load."""
    out: dict = {}
    for b in busy_levels:
        p, r = summ[f"preftune@{b}"], {}
        if trl_tools:
            best = max(trl_tools, key=lambda t: summ[f"{t}@{b}"]["pairs_per_s_train"])
            q = summ[f"{best}@{b}"]
            r = {"trl_config": best, "peak_rss": p["peak_rss_mib"] / q["peak_rss_mib"]}
            for k in ("pairs_per_s_train", "pairs_per_s_e2e", "pairs_per_s_whole", "pairs_per_cpu_s_train"):
                r[k] = p[k] / q[k]
        if f"preftune_base@{b}" in summ:
            base = summ[f"preftune_base@{b}"]
            r["vs_base_train"] = p["pairs_per_s_train"] / base["pairs_per_s_train"]
            r["vs_base_whole"] = p["pairs_per_s_whole"] / base["pairs_per_s_whole"]
        out[f"busy{b}"] = r
    if 0 in busy_levels and len(busy_levels) > 1:
        tools = {k.split("@")[0] for k in summ}
        out["slowdown"] = {f"busy{b}": {t: summ[f"{t}@{b}"]["process_s"] / summ[f"{t}@0"]["process_s"]
                                        for t in sorted(tools)} for b in busy_levels if b}
    return out


def steady(res: dict, batch: int) -> float:
    """Pairs/s at steady state: batch / median step time over steps 6..S (all steps when S ≤ 8)."""
    steps = res["step_s"]
    return batch / statistics.median(steps[5:] if len(steps) > 8 else steps)


def summarize_cuda(runs: list[dict], st: dict, model: dict, peak: float, batch: int) -> dict:
    rate = statistics.median(steady(r, batch) for r in runs)
    useful_per_pair = 6 * (model["params_body"] + model["params_head"]) * st["tokens_sequences"] / st["pairs"]
    return {"runs": len(runs), "pairs_per_s": rate,
            "peak_gpu_gib": max(r.get("peak_gpu_gib", 0.0) for r in runs),
            "mfu": useful_per_pair * rate / peak,
            "process_s": statistics.median(r["process_s"] for r in runs),
            "losses": runs[0]["losses"], "speed_line": runs[0].get("speed_line"),
            "trl_settings": runs[0].get("trl_settings")}


def _cpu_markdown(rep: dict) -> list[str]:
    m = rep["machine"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores; torch {m['torch']}, transformers {m['transformers']}, "
             f"TRL {m['trl']}; threads per run: {rep['threads']}; fp32 matmul peak "
             f"{rep['matmul_peak_flops'] / 1e9:.1f} GFLOP/s; load average {rep['load_before']} before, "
             f"{rep['load_after']} after; {rep['steps']} steps x {rep['batch_size']} pairs.", "",
             "| set | busy | tool | pairs/s train | pairs/s end-to-end | whole process (s) | ref pass (s) "
             "| peak RSS (MiB) | FLOP frac useful / executed |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for name, s in rep["sets"].items():
        for key, v in s["tools"].items():
            tool, busy = key.split("@")
            lines.append(f"| {name} | {busy} | {tool} | {v['pairs_per_s_train']:.2f} | {v['pairs_per_s_e2e']:.2f} "
                         f"| {v['process_s']:.1f} | {v['reference_s']:.1f} | {v['peak_rss_mib']:.0f} "
                         f"| {v['flop_fraction']:.2f} / {v['executed_flop_fraction']:.2f} |")
    ratios = [(name, key[4:], r) for name, s in rep["sets"].items() for key, r in s["ratios"].items()
              if key.startswith("busy")]
    if any("trl_config" in r for _, _, r in ratios):
        lines += ["", "| set | busy | preftune / TRL: train | end-to-end | whole process | peak RSS |",
                  "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {name} | {b} | {r['pairs_per_s_train']:.2f}x | {r['pairs_per_s_e2e']:.2f}x "
                  f"| {r['pairs_per_s_whole']:.2f}x | {r['peak_rss']:.2f}x |" for name, b, r in ratios if "trl_config" in r]
    if any("vs_base_train" in r for _, _, r in ratios):
        lines += ["", "| set | busy | preftune / preftune_base: train | whole process |", "|---|---:|---:|---:|"]
        lines += [f"| {name} | {b} | {r['vs_base_train']:.2f}x | {r['vs_base_whole']:.2f}x |"
                  for name, b, r in ratios if "vs_base_train" in r]
    slow = [(name, s["ratios"]["slowdown"]) for name, s in rep["sets"].items() if "slowdown" in s["ratios"]]
    if slow:
        lines += ["", "Slowdown under load (whole-process time busy / quiet, medians):", ""]
        for name, by_level in slow:
            for level, d in by_level.items():
                lines.append(f"- {name}, {level[4:]} busy: " + ", ".join(f"{t} {x:.2f}x" for t, x in d.items()))
    return lines


def _cuda_markdown(rep: dict) -> list[str]:
    m = rep["machine"]
    lines = [f"GPU: {m.get('gpu')}; torch {m['torch']}, transformers {m['transformers']}, TRL {m['trl']}; "
             f"bf16 matmul peak {rep['matmul_peak_flops'] / 1e12:.0f} TFLOP/s; {rep['steps']} steps x "
             f"{rep['batch_size']} pairs; fp32 weights, bf16 autocast; steady state = steps 6..S.", "",
             "| model | set | tool | pairs/s | peak GPU (GiB) | MFU | vs TRL default | vs TRL no-ckpt |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    notes = []
    for preset, p in rep["presets"].items():
        for name, s in p["sets"].items():
            t = s["tools"]
            for tool, v in t.items():
                vs = [f"{v['pairs_per_s'] / t[ref]['pairs_per_s']:.2f}x speed, "
                      f"{v['peak_gpu_gib'] / t[ref]['peak_gpu_gib']:.2f}x mem" if ref in t and t[ref]["peak_gpu_gib"]
                      else "" for ref in ("trl", "trl_nockpt")]
                lines.append(f"| {preset} | {name} | {tool} | {v['pairs_per_s']:.2f} | {v['peak_gpu_gib']:.2f} "
                             f"| {100 * v['mfu']:.0f}% | {vs[0]} | {vs[1]} |")
            if "preftune_plain" in t and "preftune" in t:
                a, b = t["preftune"]["losses"], t["preftune_plain"]["losses"]
                worst = max(abs(x - y) for x, y in zip(a, b))
                notes.append(f"Exactness ({preset}, {name}, bf16): max |loss(default) - loss(plain path)| over "
                             f"{min(len(a), len(b))} steps = {worst:.2e} (target < 1e-3)")
    lines += [""] + notes
    if rep.get("skipped"):
        lines.append(f"\nSkipped (time budget): {', '.join(rep['skipped'])}")
    if rep.get("errors"):
        lines.append(f"\nFailed runs: {', '.join(e['run'] for e in rep['errors'])}")
    speed = {v["speed_line"] for p in rep["presets"].values() for s in p["sets"].values()
             for v in s["tools"].values() if v.get("speed_line")}
    lines += [""] + [f"- `{x}`" for x in sorted(speed)]
    return lines


def markdown(rep: dict) -> str:
    return "\n".join(_cuda_markdown(rep) if rep["device"] == "cuda" else _cpu_markdown(rep)) + "\n"
