"""The on-policy story (`python -m examples.news_demo --on-policy`): the same SFT model and held-out articles as
the demo, but the pairs come from the model itself instead of a hand-made rule.

1. the SFT model (the shipped base) samples K summaries of each training article; the demo's graded judge
   (`judge.score`: key facts present + concise − 2 × wrong facts) scores them; the best against the worst makes a
   pair: `preftune pairs` through its Python API (`make_pairs`);
2. DPO on those pairs, and DPO on the demo's hand-made pairs (`run_demo`'s settings) to compare with;
3. the gap experiment: as many pairs with a small gap (≤ `small_gap`) as with a large one (≥ `large_gap`), drawn
   from the same on-policy pairs, DPO on each, under each `GapRecipe`;
4. rounds of `preftune iterate` from the SFT model (when preftune has it);
5. greedy summaries of the same held-out articles as the demo by every model, judged by the demo's judge
   (`judge_summary`, or `--judge`); the good rate with its 95% Wilson interval (`preftune.judging`).

Everything is preftune's public API; the story adds its judge, the gap split and the table. The table is printed
and written with every figure to OUTPUT_DIR/onpolicy.json; each model's summaries to summaries.jsonl.
"""

from __future__ import annotations

import json
import platform
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from examples.news_demo import judge as judge_module
from examples.news_demo import news
from examples.news_demo.base import write_jsonl
from examples.news_demo.judge import as_judge_result, graded_score, load_judge
from examples.news_demo.pipeline import (
    DEMO_FILES,
    ONPOLICY_FILES,
    DemoSettings,
    _say,
    _sft_model,
    _Stages,
    prepare_output_dir,
    summarize,
    summary_metrics,
    train_dpo,
)
from preftune.data.stats import quantile
from preftune.errors import PreftuneError
from preftune.judging import wilson_interval
from preftune.modeling.load import load_model_and_tokenizer
from preftune.onpolicy import IterateConfig, PairsConfig, iterate, make_pairs
from preftune.onpolicy.judges import function_judge

# The graded judge in the form a user passes to `preftune pairs --judge` (a file and a function).
PAIRS_JUDGE = f"{Path(judge_module.__file__).resolve()}:score"
FILES = ("onpolicy.json", "summaries.jsonl", "data", "dpo") + ONPOLICY_FILES[1:]


@dataclass(frozen=True)
class GapRecipe:
    """DPO hyperparameters of one arm of the gap experiment (both gap sizes train with them)."""

    label: str
    beta: float
    learning_rate: float
    sft_weight: float = 0.0


@dataclass(frozen=True)
class OnPolicySettings:
    """Sizes and hyperparameters of the on-policy story; `quick()` is the shortened run the tests use."""

    n_articles: int = 1000         # training articles whose prompts are sampled (the hand-made pairs' first 1000)
    samples: int = 4               # K answers per prompt
    temperature: float = 1.0       # the policy's own distribution, which on-policy DPO assumes
    sample_batch_size: int = 512   # answers decoded together: the fastest measured (bench/demo_sampling.py)
    dpo_steps: int = 50            # DPO on the on-policy pairs: 50 steps of 16 (~1 epoch of ~830 pairs)
    beta: float = 0.1
    learning_rate: float = 1e-4
    small_gap: float = 3.0         # a pair whose chosen − rejected score is at most this is "small"
    large_gap: float = 5.0         # at least this is "large" (the reference scores 6, a vague summary 1)
    gap_steps: int = 40
    gap_recipes: tuple[GapRecipe, ...] = (GapRecipe("beta 0.1", 0.1, 1e-4),
                                          GapRecipe("beta 0.5 + NLL 1", 0.5, 3e-4, 1.0))
    rounds: int = 3                # of `preftune iterate` from the SFT model, with its own defaults (beta 0.5 + NLL)
    round_batch_size: int | None = None  # None: iterate's
    # iterate keeps train's 1e-6, which is for large models: this 0.4M-parameter one learns at 3e-4 (BENCHMARKS.md,
    # "iterate: defaults chosen by measurement")
    round_learning_rate: float | None = 3e-4
    demo: DemoSettings = field(default_factory=DemoSettings)  # the hand-made DPO; generation and length limits

    @classmethod
    def quick(cls) -> OnPolicySettings:
        demo = DemoSettings(n_pairs=32, dpo_steps=3, batch_size=8, learning_rate=1e-3)
        return cls(n_articles=32, dpo_steps=3, gap_steps=2, learning_rate=1e-3, demo=demo, rounds=1,
                   round_batch_size=8, round_learning_rate=1e-3, gap_recipes=(GapRecipe("beta 0.1", 0.1, 1e-3),))


def run_onpolicy_demo(output_dir: str | Path = "runs/demo-onpolicy", *, from_scratch: bool = False,
                      n_eval: int = 200, judge: str | Any = None, pairs_judge: str | Any = None, seed: int = 0,
                      quick: bool = False, overwrite: bool = False, progress: bool = True,
                      settings: OnPolicySettings | None = None,
                      base_dir: str | Path | None = None) -> dict[str, Any]:
    """Run the on-policy story end to end and return what it writes to `output_dir`/onpolicy.json.

    `judge` judges the held-out summaries as in `run_demo` (default `judge_summary`); `pairs_judge` scores the
    sampled answers for `preftune pairs` (default `judge.score`; a "module:function" or "file.py:function"
    pointwise score(prompt, answer), or a callable)."""
    t_start = time.time()
    settings = settings or (OnPolicySettings.quick() if quick else OnPolicySettings())
    if n_eval < 1:
        raise PreftuneError(f"n_eval must be at least 1 held-out article, got {n_eval}.")
    judge_fn = load_judge(judge)
    pairs_judge = pairs_judge or PAIRS_JUDGE
    if isinstance(pairs_judge, str) and ":" in pairs_judge:
        function_judge(pairs_judge)  # a judge that cannot be imported is refused before anything is written
    names = FILES + (DEMO_FILES[4:] if from_scratch else ())
    out = prepare_output_dir(Path(output_dir), names, overwrite)
    stages = _Stages()
    _say(f"preftune on-policy demo → {out}   (pairs sampled from the SFT model and judged, against hand-made ones)")
    with stages("base"):
        sft_dir = _sft_model(out, settings.demo, from_scratch=from_scratch, base_dir=base_dir, seed=seed,
                             progress=progress, step="[1/7]")
    with stages("data"):
        prompts_file, handmade_file, held = _write_data(out / "data", settings, n_eval=n_eval, seed=seed)
    with stages("pairs"):
        pairs = _sample_pairs(sft_dir, prompts_file, out / "data" / "onpolicy_pairs.jsonl", settings,
                              judge=pairs_judge, seed=seed, progress=progress)
    models: dict[str, dict[str, Any]] = {"sft": {"label": "SFT (the starting point)", "dir": str(sft_dir)}}
    with stages("dpo"):
        _train_main(models, sft_dir, out, settings, handmade_file, pairs, seed=seed, progress=progress)
    with stages("gap"):
        gap = _gap_experiment(models, sft_dir, out, settings, pairs, seed=seed, progress=progress)
    with stages("iterate"):
        rounds = _iterate(models, sft_dir, out, settings, prompts_file, judge=pairs_judge, seed=seed,
                          progress=progress)
    with stages("evaluate"):
        _say(f"[7/7] greedy summaries of the {len(held)} held-out articles by each of the {len(models)} models, "
             "judged")
        rows = evaluate_models(models, held, settings.demo, judge_fn)
    stages.timings["total"] = round(time.time() - t_start, 1)
    result = _result(out, models, pairs, gap, settings, judge_fn, n_eval=len(held), seed=seed, quick=quick,
                     timings=stages.timings)
    result["iterate"] = rounds
    write_jsonl(out / "summaries.jsonl", rows)
    (out / "onpolicy.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    _say(render_table(result))
    return result


def _write_data(data_dir: Path, settings: OnPolicySettings, *, n_eval: int,
                seed: int) -> tuple[Path, Path, list[news.Article]]:
    """The prompts to sample (the first `n_articles` training articles), the hand-made pairs (the demo's), the
    held-out articles (the demo's)."""
    n_handmade = max(settings.demo.n_pairs, settings.n_articles)
    train_articles = news.generate_articles(n_handmade, seed=seed + 1000, split="train")
    prompts = write_jsonl(data_dir / "prompts.jsonl", ({"prompt": news.make_prompt(a)}
                                                      for a in train_articles[:settings.n_articles]))
    handmade = news.build_preference_records(train_articles[:settings.demo.n_pairs], seed=seed)
    handmade_file = write_jsonl(data_dir / "pairs.jsonl", ({k: r[k] for k in ("prompt", "chosen", "rejected")}
                                                           for r in handmade))
    held = news.generate_articles(n_eval, seed=seed, split="heldout")
    write_jsonl(data_dir / "heldout_articles.jsonl", (a.to_dict() for a in held))
    write_jsonl(data_dir / "heldout_prompts.jsonl", ({"prompt": news.make_prompt(a)} for a in held))
    _say(f"[2/7] data: {settings.n_articles:,} training articles to sample from; {len(handmade):,} hand-made pairs "
         f"(the demo's); {len(held)} held-out articles (the demo's)")
    return prompts, handmade_file, held


def _sample_pairs(sft_dir: Path, prompts: Path, output: Path, settings: OnPolicySettings, *, judge: Any, seed: int,
                  progress: bool) -> dict[str, Any]:
    """`preftune pairs`: K summaries per prompt from the SFT model, scored by `judge`, best against worst."""
    _say(f"[3/7] preftune pairs: {settings.samples} summaries of each of {settings.n_articles:,} articles from the "
         f"SFT model (temperature {settings.temperature:g}), scored by the graded judge, best vs worst")
    res = make_pairs(PairsConfig(model=str(sft_dir), prompts=str(prompts), output=str(output), judge=judge,
                                 samples=settings.samples, temperature=settings.temperature,
                                 max_new_tokens=settings.demo.max_new_tokens, seed=seed,
                                 batch_size=settings.sample_batch_size, device="cpu", progress=progress), say=_say)
    rows = [json.loads(line) for line in res.output.read_text(encoding="utf-8").splitlines()]
    return {"file": str(res.output), "rows": rows, "summary": res.summary}


def _train_main(models: dict, sft_dir: Path, out: Path, settings: OnPolicySettings, handmade: Path,
                pairs: dict[str, Any], *, seed: int, progress: bool) -> None:
    """DPO on the demo's hand-made pairs (its settings) and on the on-policy pairs."""
    d = settings.demo
    _say(f"[4/7] DPO on the {d.n_pairs:,} hand-made pairs ({d.dpo_steps} steps of {d.batch_size}, beta {d.beta:g}, "
         f"lr {d.learning_rate:g}: the demo's) and on the {len(pairs['rows']):,} on-policy pairs "
         f"({settings.dpo_steps} steps, beta {settings.beta:g}, lr {settings.learning_rate:g})")
    res = train_dpo(sft_dir, handmade, out / "dpo", d, seed=seed, progress=progress)
    models["handmade"] = {"label": "DPO, hand-made pairs (the demo)", "dir": str(res.final_dir),
                          "pairs": d.n_pairs, "steps": d.dpo_steps, "beta": d.beta, "learning_rate": d.learning_rate}
    if not pairs["rows"]:
        raise PreftuneError("preftune pairs kept no pair (every prompt's summaries scored the same); sample more "
                            "articles or more summaries per article.")
    res = train_dpo(sft_dir, Path(pairs["file"]), out / "dpo_onpolicy", d, seed=seed, progress=progress,
                    steps=settings.dpo_steps, learning_rate=settings.learning_rate, beta=settings.beta)
    models["onpolicy"] = {"label": "DPO, on-policy pairs (best vs worst)", "dir": str(res.final_dir),
                          "pairs": len(pairs["rows"]), "gap_median": _median([r["gap"] for r in pairs["rows"]]),
                          "steps": settings.dpo_steps, "beta": settings.beta, "learning_rate": settings.learning_rate}


def split_by_gap(rows: list[dict], small: float, large: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Equal numbers of pairs with gap ≤ `small` and with gap ≥ `large`: the larger side is subsampled (seeded,
    file order kept) to the size of the smaller."""
    lo = [r for r in rows if r["gap"] <= small]
    hi = [r for r in rows if r["gap"] >= large]
    n = min(len(lo), len(hi))
    rng = random.Random(f"gap-split-{seed}")
    pick = lambda side: [side[i] for i in sorted(rng.sample(range(len(side)), n))]  # noqa: E731
    return pick(lo), pick(hi)


def _gap_experiment(models: dict, sft_dir: Path, out: Path, settings: OnPolicySettings, pairs: dict[str, Any], *,
                    seed: int, progress: bool) -> dict[str, Any]:
    """DPO on equal numbers of small-gap and large-gap pairs, under each of `settings.gap_recipes`."""
    small, large = split_by_gap(pairs["rows"], settings.small_gap, settings.large_gap, seed)
    n = len(small)
    gap = {"small_gap": settings.small_gap, "large_gap": settings.large_gap, "pairs_each": n,
           "available": {"small": sum(r["gap"] <= settings.small_gap for r in pairs["rows"]),
                         "large": sum(r["gap"] >= settings.large_gap for r in pairs["rows"])}}
    if not n:
        _say(f"[5/7] gap experiment skipped: no pairs with gap <= {settings.small_gap:g} or none >= "
             f"{settings.large_gap:g}")
        return gap
    files = {}
    for name, side in (("small", small), ("large", large)):
        files[name] = write_jsonl(out / "data" / f"gap_{name}.jsonl", side)
        gap[f"{name}_gap_median"] = _median([r["gap"] for r in side])
    _say(f"[5/7] gap experiment: {n} pairs with gap <= {settings.small_gap:g} against {n} with gap >= "
         f"{settings.large_gap:g}, DPO {settings.gap_steps} steps on each, "
         f"{len(settings.gap_recipes)} setting(s)")
    for i, recipe in enumerate(settings.gap_recipes):
        for name in ("small", "large"):
            res = train_dpo(sft_dir, files[name], out / "dpo_gap" / f"{name}-{i}", settings.demo, seed=seed,
                            progress=progress, steps=settings.gap_steps, learning_rate=recipe.learning_rate,
                            beta=recipe.beta, sft_weight=recipe.sft_weight)
            bound = f"<= {settings.small_gap:g}" if name == "small" else f">= {settings.large_gap:g}"
            models[f"gap_{name}_{i}"] = {
                "label": f"{name} gap ({bound}), {recipe.label}, lr {recipe.learning_rate:g}",
                "dir": str(res.final_dir), "pairs": n, "gap_median": gap[f"{name}_gap_median"],
                "steps": settings.gap_steps, "recipe": asdict(recipe)}
    return gap


def _iterate(models: dict, sft_dir: Path, out: Path, settings: OnPolicySettings, prompts: Path, *, judge: Any,
             seed: int, progress: bool) -> dict[str, Any]:
    """`preftune iterate` from the SFT model on the same prompts and judge: each round samples pairs from the
    round's model and trains DPO from it (its reference), with iterate's defaults; its own evaluation runs on the
    held-out articles' prompts, a score of 6 (every fact, concise, nothing wrong) counting as good."""
    if not settings.rounds:
        return {}
    _say(f"[6/7] preftune iterate: {settings.rounds} round(s) of pairs → DPO from the round's model, the same "
         "prompts and judge")
    d = settings.demo
    given = {k: v for k, v in (("batch_size", settings.round_batch_size),
                               ("learning_rate", settings.round_learning_rate)) if v is not None}
    cfg = IterateConfig(
        model=str(sft_dir), prompts=str(prompts), output_dir=str(out / "iterate"), judge=judge, rounds=settings.rounds,
        eval_prompts=str(out / "data" / "heldout_prompts.jsonl"), good_score=6.0, samples=settings.samples,
        temperature=settings.temperature, max_new_tokens=d.max_new_tokens, sample_batch_size=settings.sample_batch_size,
        max_length=d.max_length, max_prompt_length=d.max_prompt_length, seed=seed, device="cpu", progress=progress,
        **given)
    res = iterate(cfg, say=_say)
    how = f"beta {cfg.beta:g} + NLL {cfg.sft_weight:g}, lr {cfg.learning_rate:g}"
    for row in res.rounds[1:]:
        if row.get("status", "").startswith("kept") and row.get("pairs"):
            models[f"round_{row['round']}"] = {
                "label": f"iterate round {row['round']} ({how})", "dir": row["model"], "pairs": row["pairs"],
                "gap_median": row.get("gap_median"), "steps": row.get("steps")}
    return {"result": res.model, "stopped": res.stopped, "rounds": res.rounds}


def evaluate_models(models: dict, held: list[news.Article], settings: DemoSettings, judge_fn: Any) -> list[dict]:
    """Each model's greedy summaries of the held-out articles, judged; its metrics into `models`. Returns the
    rows of summaries.jsonl (one per article: every model's summary and verdict)."""
    prompts = [news.make_prompt(a) for a in held]
    rows: list[dict] = [{"id": a.id, "reference": a.reference} for a in held]
    for key, m in models.items():
        model, tokenizer = load_model_and_tokenizer(m["dir"])
        summaries = summarize(model, tokenizer, prompts, settings)
        verdicts = [as_judge_result(judge_fn(a, s)) for a, s in zip(held, summaries)]
        good = sum(v.good for v in verdicts)
        m["metrics"] = {**summary_metrics(summaries, verdicts), "good": good,
                        "good_ci95": [round(x, 4) for x in wilson_interval(good, len(held))],
                        "mean_score": round(sum(graded_score(a, s) for a, s in zip(held, summaries)) / len(held), 3)}
        for row, s, v in zip(rows, summaries, verdicts):
            row[key] = s
            row[f"{key}_verdict"] = v.to_dict()
    return rows


def _median(values: list[float]) -> float | None:
    return round(quantile(sorted(values), 0.5), 4) if values else None


def _result(out: Path, models: dict, pairs: dict[str, Any], gap: dict[str, Any], settings: OnPolicySettings,
            judge_fn: Any, *, n_eval: int, seed: int, quick: bool, timings: dict[str, float]) -> dict[str, Any]:
    return {
        "story": "news summaries: DPO on pairs sampled from the SFT model and judged (preftune pairs), against "
                 "the demo's hand-made pairs; equal numbers of small-gap and large-gap pairs",
        "output_dir": str(out), "seed": seed, "quick": quick, "n_eval": n_eval,
        "judge": getattr(judge_fn, "__module__", "?") + ":" + getattr(judge_fn, "__qualname__", "?"),
        "settings": asdict(settings), "pairs_file": pairs["file"], "pairs_summary": pairs["summary"],
        "models": models, "gap_experiment": gap, "timings_s": timings,
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
    }


def render_table(result: dict) -> str:
    """The story's table: each model's held-out figures, the gap experiment's arms under their settings."""
    pct = lambda x: f"{100 * x:5.1f}%"  # noqa: E731
    models = result["models"]
    n = result["n_eval"]
    lines = ["", f"Held-out articles ({n}, greedy decoding), judged by {result['judge']}",
             f"{'model':<58} {'pairs':>5} {'gap':>4}  {'good':>6}  {'95% Wilson':<16} {'factual':>7} "
             f"{'concise':>7} {'words':>5} {'score':>5}"]
    for key, m in models.items():
        if key == "round_1":
            it = result["iterate"]
            lines.append(f"preftune iterate: {len(it['rounds']) - 1} round(s) from the SFT model"
                         + (f"; stopped: {it['stopped']}" if it.get("stopped") else ""))
        if key == "gap_small_0":
            g = result["gap_experiment"]
            lines.append(f"gap experiment: {g['pairs_each']} pairs each (of {g['available']['small']} with gap <= "
                         f"{g['small_gap']:g} and {g['available']['large']} with gap >= {g['large_gap']:g}), "
                         f"{models[key]['steps']} DPO steps")
        x = m["metrics"]
        lo, hi = x["good_ci95"]
        gap = f"{m['gap_median']:g}" if m.get("gap_median") is not None else "-"
        lines.append(f"{m['label']:<58} {m.get('pairs', '-'):>5} {gap:>4}  {pct(x['good_rate'])}  "
                     f"{pct(lo)} .. {pct(hi)} {pct(x['factual_rate']):>7} {pct(x['concise_rate']):>7} "
                     f"{x['mean_words']:5.1f} {x['mean_score']:5.2f}")
    s, t = result["pairs_summary"], result["timings_s"]
    lines += ["(gap: the pairs' median chosen − rejected score; score: the graded judge's mean on the held-out "
              "summaries, 6 = the reference)",
              f"pairs: {s['pairs']:,} from {s['prompts']:,} prompts × {result['settings']['samples']} samples; "
              f"dropped {s['dropped']['ties']:,} ties, {s['dropped']['prompts_with_one_distinct_answer']:,} "
              "prompts with one distinct summary",
              f"total time {t['total']:.0f}s ({', '.join(f'{k} {v:.0f}s' for k, v in t.items() if k != 'total')})",
              f"written: {Path(result['output_dir']) / 'onpolicy.json'}"]
    return "\n".join(lines)
