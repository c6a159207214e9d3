"""The news demo (`make demo`, `python -m examples.news_demo`): the whole preference-tuning story on a
laptop CPU, with proof that DPO helped.

We want a model that summarizes news articles concisely and informatively. Its SFT model (the shipped
base, `base.py`) learned from a newsroom whose desks write differently, so it writes a crisp factual
summary for some articles and a long, vague or wrong one for others. `run_demo`:

1. takes the SFT model (shipped, or built from scratch with `from_scratch=True`);
2. generates preference pairs on training articles: the reference summary chosen, a bad one rejected;
3. runs DPO (`preftune.train`) with the SFT model as the frozen reference;
4. writes greedy summaries of held-out articles (new organisation/place combinations) with both models;
5. judges them (`judge.judge_summary` or the user's own), and measures on held-out pairs the preference
   accuracy of DPO's implicit reward, and the per-token KL of DPO to SFT on DPO's own samples;
6. prints a before/after table and the metrics, and writes everything to OUTPUT_DIR/demo.json.

It lives outside the preftune package (so the wheel ships no demo weights) and uses only preftune's public
functions: `train`, `TrainConfig`, `scoring.score_records`/`score_completions`, `modeling.load`.
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
from examples.news_demo.judge import Judge, as_judge_result, load_judge
from preftune.errors import PreftuneError

# Files and folders a demo run writes into OUTPUT_DIR (the last two only with from_scratch).
DEMO_FILES = ("demo.json", "summaries.jsonl", "data", "dpo", "base", "base_work")
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
    fact-checking `judge_summary`). `quick` shortens everything (the tests' demo); `settings` overrides
    the sizes and hyperparameters entirely. `base_dir` starts from another SFT model folder than the
    shipped one (with the demo's tokenizer); `from_scratch` builds one first.
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

        torch.manual_seed(seed)
        sft_model, tokenizer = load_model_and_tokenizer(str(sft_dir))
        dpo_model, _ = load_model_and_tokenizer(str(dpo_dir))
        prompts = [news.make_prompt(a) for a in held]
        _say(f"[4/5] writing greedy summaries of {len(held)} held-out articles with the SFT and the DPO model")
        gen = dict(batch_size=settings.gen_batch_size, max_new_tokens=settings.max_new_tokens)
        sft_out = generate(sft_model, tokenizer, prompts, **gen)
        dpo_out = generate(dpo_model, tokenizer, prompts, **gen)

    with stages("evaluate"):  # 5. judge, preference accuracy, KL
        _say("[5/5] judging the summaries; preference accuracy on held-out pairs; KL of DPO to SFT on DPO's samples")
        sft_verdicts = [as_judge_result(judge_fn(a, s)) for a, s in zip(held, sft_out)]
        dpo_verdicts = [as_judge_result(judge_fn(a, s)) for a, s in zip(held, dpo_out)]
        pref = preference_accuracy(sft_model, dpo_model, tokenizer, held_pairs, beta=settings.beta)
        samples = generate(dpo_model, tokenizer, prompts, do_sample=True, **gen)
        kl = per_token_kl(dpo_model, sft_model, tokenizer, prompts, samples)

    metrics = {
        "n_eval": len(held),
        "sft": summary_metrics(sft_out, sft_verdicts),
        "dpo": summary_metrics(dpo_out, dpo_verdicts),
        **pref,
        "kl_dpo_sft_per_token": kl,
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
        "dpo_train_metrics": res.train_metrics, "timings_s": stages.timings,
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
    }
    write_jsonl(out / "summaries.jsonl", (
        {"id": a.id, "reference": a.reference, "sft": s, "dpo": d, "sft_verdict": sv.to_dict(),
         "dpo_verdict": dv.to_dict()}
        for a, s, d, sv, dv in zip(held, sft_out, dpo_out, sft_verdicts, dpo_verdicts)))
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
               progress: bool) -> Path:
    """Stage 1: the committed SFT base (or `base_dir`), or one built from scratch into OUTPUT_DIR/base."""
    if not from_scratch:
        sft_dir = check_base(base_dir if base_dir is not None else ASSETS_BASE)
        _say(f"[1/5] SFT model: {sft_dir} (build one from scratch with --from-scratch)")
        return sft_dir
    _say("[1/5] building the SFT base from scratch: tokenizer + tiny Llama + preftune sft on good and bad summaries")
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
    from preftune import TrainConfig, train

    _say(f"[3/5] DPO: preftune train, {settings.dpo_steps} steps of {settings.batch_size} pairs, "
         f"beta {settings.beta}, the SFT model as the frozen reference")
    res = train(TrainConfig(
        model=str(sft_dir), data=str(pairs_file), output_dir=str(run_dir), max_steps=settings.dpo_steps,
        batch_size=settings.batch_size, learning_rate=settings.learning_rate, lr_scheduler="cosine",
        warmup_ratio=0.1, beta=settings.beta, loss="sigmoid", max_length=256, max_prompt_length=224, seed=seed,
        logging_steps=max(1, settings.dpo_steps // 5), progress=progress, overwrite=True))
    if res.interrupted:
        raise PreftuneError(f"DPO was stopped after {res.steps} of {settings.dpo_steps} steps; run the demo again.")
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
        if not isinstance(entries, list) or not set(entries) <= set(DEMO_FILES):
            raise ValueError(f"it lists names the demo never writes: {entries!r}")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PreftuneError(f"the demo manifest {path} cannot be trusted ({e}), so nothing in {out} is "
                            "replaced; remove the folder yourself or choose another --output-dir.") from None
    return set(entries)


def generate(model, tokenizer, prompts: list[str], *, batch_size: int = 64, max_new_tokens: int = 64,
             do_sample: bool = False) -> list[str]:
    """Summaries of `prompts` by `model`: greedy, or sampled at temperature 1 from the full distribution.

    Prompts are left-padded so that every row's next token sits at the same position.
    """
    import torch

    tokenizer.padding_side = "left"
    model.eval()
    texts: list[str] = []
    sampling = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0} if do_sample else {"do_sample": False}
    with torch.inference_mode():
        for s in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[s:s + batch_size], return_tensors="pt", padding=True)
            # use_cache explicitly: a model saved by a training run may carry use_cache=False in its config.
            out = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id, use_cache=True, **sampling)
            new = out[:, enc["input_ids"].shape[1]:]
            texts.extend(t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True))
    return texts


def preference_accuracy(sft_model, dpo_model, tokenizer, pairs: list[dict], *, beta: float) -> dict[str, float]:
    """Held-out preference accuracy of DPO's implicit reward, and the SFT model's likelihood preference.

    DPO's reward of an answer y is r(y) = beta * (log pi_dpo(y|x) - log pi_sft(y|x)) (Rafailov et al., 2023,
    eq. 5); a pair is ranked right when r(chosen) > r(rejected). The SFT model has no reward of its own, so
    its column is how often it finds the chosen summary more likely than the rejected one.
    """
    from preftune.scoring import score_records

    kw = dict(max_length=256, max_prompt_length=224, batch_size=32)
    s = score_records(sft_model, tokenizer, pairs, **kw)
    d = score_records(dpo_model, tokenizer, pairs, **kw)
    margin = beta * ((d["chosen_logps"] - s["chosen_logps"]) - (d["rejected_logps"] - s["rejected_logps"]))
    return {
        "preference_accuracy": round(float((margin > 0).float().mean()), 4),
        "reward_margin_mean": round(float(margin.mean()), 4),
        "sft_likelihood_preference": round(float((s["chosen_logps"] > s["rejected_logps"]).float().mean()), 4),
        "dpo_likelihood_preference": round(float((d["chosen_logps"] > d["rejected_logps"]).float().mean()), 4),
    }


def per_token_kl(policy, reference, tokenizer, prompts: list[str], samples: list[str]) -> float:
    """Monte-Carlo KL(pi_policy || pi_reference) per token on samples y ~ pi_policy:

        KL ≈ sum_i [log pi_policy(y_i|x_i) - log pi_reference(y_i|x_i)] / sum_i |y_i|

    (|y_i| counts the EOS that ends each sample, which both models also score).
    """
    from preftune.scoring import score_completions

    completions = [" " + s for s in samples]
    lp_pol, n_tok = score_completions(policy, tokenizer, prompts, completions, batch_size=32)
    lp_ref, _ = score_completions(reference, tokenizer, prompts, completions, batch_size=32)
    return round(float((lp_pol - lp_ref).sum() / n_tok.sum()), 4)


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
    s, d = m["sft"], m["dpo"]
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
        f"  preference accuracy of DPO's implicit reward            {pct(m['preference_accuracy'])}",
        f"  KL(DPO || SFT) per token on DPO's own samples            {m['kl_dpo_sft_per_token']:.3f} nats",
        "",
        f"good-rate gain: {100 * m['good_rate_gain']:+.1f} points; total time {result['timings_s']['total']:.0f}s "
        f"({', '.join(f'{k} {v:.0f}s' for k, v in result['timings_s'].items() if k != 'total')})",
        f"written: {Path(result['output_dir']) / 'demo.json'}",
    ]
    return "\n".join(lines)

