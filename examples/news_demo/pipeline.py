"""The news demo (`make demo`, `python -m examples.news_demo`): the whole preference-tuning story on a
laptop CPU, with proof that DPO helped.

We want a model that summarizes news articles concisely and informatively. Its SFT model (the shipped
base, `base.py`) learned from a newsroom whose desks write differently, so it writes a crisp factual
summary for some articles and a long, vague or wrong one for others. `run_demo`:

1. takes the SFT model (shipped, or built from scratch with `from_scratch=True`);
2. generates preference pairs on training articles: the reference summary chosen, a bad one rejected;
3. runs DPO (`preftune.train`) with the SFT model as the frozen reference;
4. writes greedy summaries of held-out articles (new organisation/place combinations) with both models
   (`preftune.generate`);
5. judges each summary (`judge.judge_summary` or the user's own pointwise judge) for the good-rate table,
   and the two models' summaries side by side for preftune's win rate of DPO over SFT (`PairwiseJudge`,
   `preftune.judging`); measures with `preftune.evaluate` on held-out pairs the preference accuracy of
   DPO's implicit reward, both models' likelihood preference, and the per-token KL of DPO to SFT on DPO's
   own samples;
6. prints a before/after table and the metrics, and writes everything to OUTPUT_DIR/demo.json.

It lives outside the preftune package (so the wheel ships no demo weights) and uses only preftune's public
functions: `train`, `TrainConfig`, `generate`, `evaluate`, `judging`, `modeling.load`. Every measurement is
the library's; the demo adds only its own judge and the table.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from examples.news_demo import news
from examples.news_demo.base import ASSETS_BASE, BaseRecipe, build_base, check_base, write_jsonl
from examples.news_demo.judge import Judge, PairwiseJudge, load_judge
from preftune.errors import PreftuneError

# Files and folders a demo run writes into OUTPUT_DIR (the last two only with from_scratch).
DEMO_FILES = ("demo.json", "summaries.jsonl", "data", "dpo", "base", "base_work")
# What the on-policy story (`--on-policy`, onpolicy.py) writes besides data/, dpo/ and summaries.jsonl.
ONPOLICY_FILES = ("onpolicy.json", "dpo_onpolicy", "dpo_gap", "iterate")
# Written into OUTPUT_DIR before anything else: the names this run creates there. overwrite=True deletes only
# names a manifest lists, so a user's own data/ or base/ in the folder is never taken for an earlier demo's.
MANIFEST = "demo_manifest.json"


@dataclass(frozen=True)
class DemoSettings:
    """Sizes and hyperparameters of one demo run; `quick()` is the shortened run the tests use."""

    n_pairs: int = 2000            # DPO training pairs, from training articles
    dpo_steps: int = 125           # optimizer steps (batch_size pairs each: 1 epoch of n_pairs)
    batch_size: int = 16
    learning_rate: float = 3e-4
    # A rejected summary differs from the chosen one in a few tokens. With the usual beta = 0.1 the loss
    # keeps pushing those down long after the pair is ranked right (rejected log-probs fall to -90 nats) and
    # sampled text drifts (beta 0.1, lr 1e-4: good 86.5%, KL to SFT 1.7 nats/token). beta = 1 saturates at
    # a margin of a few nats (beta 1, lr 3e-4: good 99%, KL 0.08), measured on the shipped base with seed 0.
    beta: float = 1.0
    max_new_tokens: int = 64       # a verbose summary is ~45 words; a good one ~17 tokens
    max_length: int = 256          # training's and the held-out pairs' token limits (prompts are ~150 tokens)
    max_prompt_length: int = 224
    gen_batch_size: int = 64
    n_show: int = 3                # articles in the before/after table
    base: BaseRecipe = field(default_factory=BaseRecipe)

    @classmethod
    def quick(cls) -> DemoSettings:
        # 20 steps instead of 125: a larger step size covers the same ground (45.8% -> 89.6% good on 48 articles).
        return cls(n_pairs=320, dpo_steps=20, learning_rate=1e-3, base=BaseRecipe.quick())


def run_demo(output_dir: str | Path = "runs/demo", *, from_scratch: bool = False, n_eval: int = 200,
             judge: str | Judge | None = None, seed: int = 0, quick: bool = False, overwrite: bool = False,
             progress: bool = True, settings: DemoSettings | None = None,
             base_dir: str | Path | None = None) -> dict[str, Any]:
    """Run the demo end to end and return what it writes to `output_dir`/demo.json.

    `judge` is ``"module:function"`` or a callable ``(article, summary) -> JudgeResult`` (default: the
    fact-checking `judge_summary`; see `judge` for the protocol). `quick` shortens everything (the tests'
    demo); `settings` overrides the sizes and hyperparameters entirely. `base_dir` starts from another SFT
    model folder than the shipped one (with the demo's tokenizer); `from_scratch` builds one first.
    """
    t_start = time.time()
    settings = settings or (DemoSettings.quick() if quick else DemoSettings())
    if n_eval < 1:
        raise PreftuneError(f"n_eval must be at least 1 held-out article, got {n_eval}.")
    judge_fn = load_judge(judge)
    out = prepare_output_dir(Path(output_dir), DEMO_FILES if from_scratch else DEMO_FILES[:4], overwrite)
    stages = _Stages()
    _say(f"preftune demo → {out}   (news summaries: does DPO teach a tiny model to prefer the crisp factual one?)")

    with stages("base"):  # 1. the SFT model
        sft_dir = _sft_model(out, settings, from_scratch=from_scratch, base_dir=base_dir, seed=seed,
                             progress=progress)
    with stages("data"):  # 2. training pairs, held-out articles and their pairs
        pairs_file, held, held_pairs = _write_data(out / "data", settings, n_eval=n_eval, seed=seed)
    with stages("dpo"):  # 3. DPO
        res = _train_dpo(sft_dir, pairs_file, out / "dpo", settings, seed=seed, progress=progress)
        dpo_dir = res.final_dir

    with stages("generate"):  # 4. greedy summaries of the held-out articles
        import torch

        from preftune.modeling.load import load_model_and_tokenizer

        sft_model, tokenizer = load_model_and_tokenizer(str(sft_dir))
        dpo_model, _ = load_model_and_tokenizer(str(dpo_dir))
        prompts = [news.make_prompt(a) for a in held]
        _say(f"[4/5] writing greedy summaries of {len(held)} held-out articles with the SFT and the DPO model")
        sft_out = summarize(sft_model, tokenizer, prompts, settings)
        dpo_out = summarize(dpo_model, tokenizer, prompts, settings)

    with stages("evaluate"):  # 5. judge, preference accuracy, likelihood preference, KL, win rate
        _say("[5/5] judging the summaries (each, and side by side); preference accuracy on held-out pairs; "
             "KL of DPO to SFT on DPO's samples")
        pairwise = PairwiseJudge(judge_fn, held)
        sft_verdicts = [pairwise.verdict(a, s) for a, s in zip(held, sft_out)]
        dpo_verdicts = [pairwise.verdict(a, s) for a, s in zip(held, dpo_out)]
        evaluation = measure(dpo_model, sft_model, tokenizer, held_pairs, settings, seed=seed)
        side_by_side = judge_side_by_side(pairwise, prompts, dpo_out, sft_out, seed=seed)

    metrics = {
        "n_eval": len(held),
        "sft": summary_metrics(sft_out, sft_verdicts),
        "dpo": summary_metrics(dpo_out, dpo_verdicts),
        **headline_metrics(evaluation, side_by_side),
    }
    metrics["good_rate_gain"] = round(metrics["dpo"]["good_rate"] - metrics["sft"]["good_rate"], 4)
    examples = pick_examples(held, sft_out, dpo_out, sft_verdicts, dpo_verdicts, settings.n_show)
    stages.timings["total"] = round(time.time() - t_start, 1)
    result = {
        "story": "news summaries: DPO on pairs preferring the crisp factual summary, SFT model as reference",
        "output_dir": str(out), "sft_model": str(sft_dir), "dpo_model": str(dpo_dir),
        "judge": getattr(judge_fn, "__module__", "?") + ":" + getattr(judge_fn, "__qualname__", "?"),
        "seed": seed, "quick": quick, "from_scratch": from_scratch,
        "settings": asdict(settings), "metrics": metrics, "examples": examples,
        "eval": evaluation, "dpo_train_metrics": res.train_metrics, "timings_s": stages.timings,
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
    }
    write_jsonl(out / "summaries.jsonl", (
        {"id": a.id, "reference": a.reference, "sft": s, "dpo": d, "sft_verdict": sv.to_dict(),
         "dpo_verdict": dv.to_dict(), "pairwise_verdict": _SIDES[row["verdict"]],
         "dpo_shown_as": row["model_shown_as"]}
        for a, s, d, sv, dv, row in zip(held, sft_out, dpo_out, sft_verdicts, dpo_verdicts, side_by_side)))
    (out / "demo.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    _say(render_report(result))
    return result


def _say(msg: str) -> None:
    print(msg, flush=True)


class _Stages:
    """Wall time of each stage in `timings`, printed as the stage ends (not when it raised)."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.time()
        yield
        self.timings[name] = round(time.time() - t0, 1)
        _say(f"      done in {self.timings[name]:.0f}s")


def _sft_model(out: Path, settings: DemoSettings, *, from_scratch: bool, base_dir: str | Path | None, seed: int,
               progress: bool, step: str = "[1/5]") -> Path:
    """Stage 1: the committed SFT base (or `base_dir`), or one built from scratch into OUTPUT_DIR/base."""
    if not from_scratch:
        sft_dir = check_base(base_dir if base_dir is not None else ASSETS_BASE)
        _say(f"{step} SFT model: {sft_dir} (build one from scratch with --from-scratch)")
        return sft_dir
    _say(f"{step} building the SFT base from scratch: tokenizer + tiny Llama + preftune sft on good and bad summaries")
    recipe = settings.base if seed == settings.base.seed else BaseRecipe(**{**asdict(settings.base), "seed": seed})
    return build_base(out / "base", recipe, work_dir=out / "base_work", progress=progress, say=_say)


def _write_data(data_dir: Path, settings: DemoSettings, *, n_eval: int,
                seed: int) -> tuple[Path, list[news.Article], list[dict]]:
    """Stage 2: the DPO training pairs (written to `data_dir`), the held-out articles and their pairs."""
    train_articles = news.generate_articles(settings.n_pairs, seed=seed + 1000, split="train")
    pairs = news.build_preference_records(train_articles, seed=seed)
    pairs_file = write_jsonl(data_dir / "pairs.jsonl", ({k: r[k] for k in ("prompt", "chosen", "rejected")}
                                                        for r in pairs))
    held = news.generate_articles(n_eval, seed=seed, split="heldout")
    held_pairs = news.build_preference_records(held, seed=seed + 1)
    write_jsonl(data_dir / "heldout_articles.jsonl", (a.to_dict() for a in held))
    _say(f"[2/5] data: {len(pairs):,} preference pairs (reference chosen over a verbose, vague, wrong-fact or "
         f"copied-filler summary); {len(held)} held-out articles with unseen organisation/place pairs")
    return pairs_file, held, held_pairs


def _train_dpo(sft_dir: Path, pairs_file: Path, run_dir: Path, settings: DemoSettings, *, seed: int,
               progress: bool):
    """Stage 3: `preftune.train` (DPO, sigmoid loss) from the SFT model, which is also the frozen reference."""
    _say(f"[3/5] DPO: preftune train, {settings.dpo_steps} steps of {settings.batch_size} pairs, "
         f"beta {settings.beta}, the SFT model as the frozen reference")
    return train_dpo(sft_dir, pairs_file, run_dir, settings, seed=seed, progress=progress)


def train_dpo(sft_dir: Path, pairs_file: Path, run_dir: Path, settings: DemoSettings, *, seed: int, progress: bool,
              steps: int | None = None, learning_rate: float | None = None, beta: float | None = None,
              sft_weight: float = 0.0):
    """`preftune.train` (DPO, sigmoid loss, cosine schedule) from the SFT model, also the frozen reference; the
    hyperparameters are `settings`' unless given (`sft_weight`: an NLL term on the chosen answer)."""
    from preftune import TrainConfig, train

    steps = settings.dpo_steps if steps is None else steps
    res = train(TrainConfig(
        model=str(sft_dir), data=str(pairs_file), output_dir=str(run_dir), max_steps=steps,
        batch_size=settings.batch_size, lr_scheduler="cosine", warmup_ratio=0.1, loss="sigmoid",
        learning_rate=settings.learning_rate if learning_rate is None else learning_rate,
        beta=settings.beta if beta is None else beta, sft_weight=sft_weight, max_length=settings.max_length,
        max_prompt_length=settings.max_prompt_length, seed=seed,
        logging_steps=max(1, steps // 5), progress=progress, overwrite=True))
    if res.interrupted:
        raise PreftuneError(f"DPO was stopped after {res.steps} of {steps} steps; run the demo again.")
    return res


def prepare_output_dir(out: Path, names: tuple[str, ...], overwrite: bool) -> Path:
    """Make `out` ready for a run that writes `names` into it, and record them in its manifest.

    Only what an earlier demo's manifest lists is ever deleted (with `overwrite`); any of `names` present
    but not listed is the user's, and the run stops with a sentence instead of writing into or over it.
    """
    if out.exists() and not out.is_dir():
        raise PreftuneError(f"output dir {out} is a file; pass a folder for --output-dir.")
    ours = _read_manifest(out)
    # lexists: a dangling symlink is still something in the folder the demo must not silently replace.
    foreign = [n for n in names if os.path.lexists(out / n) and n not in ours]
    if foreign:
        raise PreftuneError(
            f"output dir {out} holds {', '.join(foreign)}, which no demo manifest ({MANIFEST}) says the demo "
            f"wrote, so the demo will not write over them; choose another --output-dir.")
    earlier = [n for n in sorted(ours) if os.path.lexists(out / n)]
    if earlier and not overwrite:
        raise PreftuneError(f"output dir {out} already holds a demo run; pass --overwrite to replace it or "
                            "choose another --output-dir.")
    for name in earlier:
        p = out / name
        # A link is removed, never followed: what it points to was not written here.
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).write_text(json.dumps({"written_by": "examples/news_demo", "entries": sorted(names)},
                                           indent=2) + "\n", encoding="utf-8")
    return out


def _read_manifest(out: Path) -> set[str]:
    """The names an earlier demo's manifest in `out` lists (empty without one); refuses a manifest it
    cannot trust, since its entries decide what gets deleted."""
    path = out / MANIFEST
    if not os.path.lexists(path):
        return set()
    try:
        if path.is_symlink():
            raise ValueError("it is a symlink")
        entries = json.loads(path.read_text(encoding="utf-8"))["entries"]
        if not isinstance(entries, list) or not set(entries) <= set(DEMO_FILES + ONPOLICY_FILES):
            raise ValueError(f"it lists names the demo never writes: {entries!r}")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PreftuneError(f"the demo manifest {path} cannot be trusted ({e}), so nothing in {out} is "
                            "replaced; remove the folder yourself or choose another --output-dir.") from None
    return set(entries)


def summarize(model, tokenizer, prompts: list[str], settings: DemoSettings) -> list[str]:
    """Greedy summaries of `prompts` by `model` (`preftune.generate`: prompts encoded as training encodes
    them, left-padded batches), stripped of the space that starts each answer."""
    from preftune.generate import generate

    outs = generate(model, tokenizer, prompts, max_new_tokens=settings.max_new_tokens,
                    batch_size=settings.gen_batch_size)
    return [c.text.strip() for c in outs]


def measure(dpo_model, sft_model, tokenizer, held_pairs: list[dict], settings: DemoSettings, *,
            seed: int) -> dict[str, Any]:
    """`preftune.evaluate` of DPO against SFT (its reference) on the held-out pairs: preference accuracy of
    DPO's implicit reward and its margins, both models' likelihood preference, and KL(DPO || SFT) per token
    on one sample of DPO per held-out prompt (temperature 1, the sampled token ids scored). The greedy
    summaries are the demo's own (`summarize`), so evaluate generates none (`generate=0`)."""
    from preftune.evaluate import evaluate

    return evaluate(dpo_model, tokenizer, held_pairs, reference=sft_model, beta=settings.beta, generate=0,
                    kl_samples=len(held_pairs), max_new_tokens=settings.max_new_tokens, seed=seed,
                    batch_size=settings.gen_batch_size, max_length=settings.max_length,
                    max_prompt_length=settings.max_prompt_length)


def judge_side_by_side(pairwise: PairwiseJudge, prompts: list[str], dpo_out: list[str], sft_out: list[str], *,
                       seed: int) -> list[dict]:
    """preftune's pairwise judging of DPO's and SFT's summaries of each prompt (which one is shown first is
    a seeded coin flip); verdicts "model" (DPO better), "reference" (SFT better) or "tie"."""
    from preftune.judging import judge_pairs

    return judge_pairs(pairwise, prompts, dpo_out, sft_out, seed=seed)


_SIDES = {"model": "dpo", "reference": "sft", "tie": "tie"}


def headline_metrics(evaluation: dict[str, Any], side_by_side: list[dict]) -> dict[str, Any]:
    """The figures the demo prints, rounded, from `measure`'s result and the judged side-by-side rows."""
    from preftune.judging import win_rate

    r4 = lambda x: round(float(x), 4)  # noqa: E731
    pref, wins = evaluation["preference"], win_rate([row["verdict"] for row in side_by_side])
    return {
        "preference_accuracy": r4(pref["accuracy"]),
        "preference_accuracy_ci95": [r4(x) for x in pref["accuracy_ci95"]],
        "reward_margin_mean": r4(pref["margin"]["mean"]),
        "sft_likelihood_preference": r4(pref["likelihood_prefers_chosen"]["reference"]),
        "dpo_likelihood_preference": r4(pref["likelihood_prefers_chosen"]["model"]),
        "kl_dpo_sft_per_token": r4(evaluation["kl"]["per_token"]),
        "win_rate_dpo_over_sft": {"win_rate": r4(wins["win_rate"]), "ci95": [r4(x) for x in wins["ci95"]],
                                  "dpo_better": wins["wins"], "sft_better": wins["losses"], "ties": wins["ties"],
                                  "interval": wins["interval"]},
    }


def summary_metrics(summaries: list[str], verdicts: list) -> dict[str, float]:
    n = max(len(summaries), 1)
    return {
        "good_rate": round(sum(v.good for v in verdicts) / n, 4),
        "factual_rate": round(sum(v.factual for v in verdicts) / n, 4),
        "concise_rate": round(sum(v.concise for v in verdicts) / n, 4),
        "mean_words": round(sum(news.count_words(s) for s in summaries) / n, 2),
    }


def pick_examples(held, sft_out, dpo_out, sft_verdicts, dpo_verdicts, n: int) -> list[dict]:
    """The first `n` held-out articles whose SFT summary the judge found bad: what did DPO make of them?"""
    rows = []
    for a, s, d, sv, dv in zip(held, sft_out, dpo_out, sft_verdicts, dpo_verdicts):
        if len(rows) == n:
            break
        if not sv.good:
            rows.append({"id": a.id, "lead": a.text.split("\n\n")[0], "reference": a.reference,
                         "sft": s, "sft_verdict": sv.to_dict(), "dpo": d, "dpo_verdict": dv.to_dict()})
    return rows


def _verdict(v: dict) -> str:
    if v["good"]:
        return "GOOD"
    return "BAD: " + "; ".join(v.get("reasons", [])[:2])


def render_report(result: dict) -> str:
    """The terminal report: a before/after table of a few held-out articles, then the metrics."""
    m, width = result["metrics"], 52
    lines = ["", f"Held-out articles whose SFT summary was judged bad (first {len(result['examples'])}):"]
    for ex in result["examples"]:
        lines.append("-" * (2 * width + 3))
        lines.extend(textwrap.wrap("ARTICLE: " + ex["lead"] + " [...]", 2 * width + 3))
        left = textwrap.wrap("SFT: " + ex["sft"], width) + textwrap.wrap(_verdict(ex["sft_verdict"]), width)
        right = textwrap.wrap("DPO: " + ex["dpo"], width) + textwrap.wrap(_verdict(ex["dpo_verdict"]), width)
        for i in range(max(len(left), len(right))):
            lines.append(f"{left[i] if i < len(left) else '':<{width}} | {right[i] if i < len(right) else ''}")
    lines.append("-" * (2 * width + 3))
    s, d, w = m["sft"], m["dpo"], m["win_rate_dpo_over_sft"]
    (acc_lo, acc_hi), (w_lo, w_hi) = m["preference_accuracy_ci95"], w["ci95"]
    pct = lambda x: f"{100 * x:5.1f}%"  # noqa: E731
    lines += [
        "",
        f"Held-out metrics ({m['n_eval']} articles, greedy decoding)      SFT       DPO",
        f"  good summaries (factual and concise)          {pct(s['good_rate'])}    {pct(d['good_rate'])}",
        f"  factual (all key facts, no wrong one)         {pct(s['factual_rate'])}    {pct(d['factual_rate'])}",
        f"  concise (length within the reference's range) {pct(s['concise_rate'])}    {pct(d['concise_rate'])}",
        f"  mean length (words)                           {s['mean_words']:6.1f}    {d['mean_words']:6.1f}",
        f"  prefers the good summary (log-likelihood)     {pct(m['sft_likelihood_preference'])}    "
        f"{pct(m['dpo_likelihood_preference'])}",
        f"  preference accuracy of DPO's implicit reward            {pct(m['preference_accuracy'])}   "
        f"95% Wilson {pct(acc_lo)} .. {pct(acc_hi)}",
        f"  KL(DPO || SFT) per token on DPO's own samples            {m['kl_dpo_sft_per_token']:.3f} nats",
        f"  judged win rate of DPO over SFT (ties count half)       {pct(w['win_rate'])}   "
        f"95% Wilson {pct(w_lo)} .. {pct(w_hi)}",
        f"    (DPO's summary better {w['dpo_better']}, SFT's better {w['sft_better']}, ties {w['ties']})",
        "",
        f"good-rate gain: {100 * m['good_rate_gain']:+.1f} points; total time {result['timings_s']['total']:.0f}s "
        f"({', '.join(f'{k} {v:.0f}s' for k, v in result['timings_s'].items() if k != 'total')})",
        f"written: {Path(result['output_dir']) / 'demo.json'}",
    ]
    return "\n".join(lines)

