"""`preftune pairs`: on-policy preference pairs. K answers per prompt sampled from the policy, scored by a judge,
a clearly better and a clearly worse one kept as (chosen, rejected).

    from preftune.onpolicy import PairsConfig, make_pairs
    result = make_pairs(PairsConfig(model="runs/sft/final", prompts="prompts.jsonl", judge="my_judges:score",
                                    samples=4, min_gap=0.5, output="pairs.jsonl"))
    result.summary["pairs"], result.output                   # then: preftune train --data pairs.jsonl ...

The steps are functions of their own, for the loops built on them (rounds of iterative DPO, online DPO):
`encode_prompts` (as training encodes them) → `sample_candidates` (`preftune.generate.sample_completions`,
identical answers collapsed) → `judge_candidates` (`preftune.onpolicy.judges`) → `make_rows`
(`preftune.onpolicy.select`). Files, resume and several processes: `preftune.onpolicy.store`; the summary:
`preftune.onpolicy.summary`.

Each row holds what `train` reads (prompt, chosen, rejected; chat messages when the prompt is a conversation or
`chat` is on) plus `score_chosen`, `score_rejected`, `gap` and `source`: the model, the judge, the seed, the
prompt's index and line, and for each side its sample index, how many of the K draws gave it, its length in
tokens and whether it was cut at max_new_tokens.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from preftune.data.cache import source_fingerprint
from preftune.errors import PreftuneError
from preftune.generate import (
    Completion,
    Sampling,
    encode_prompt,
    load_model_for_generation,
    max_positions,
    prompt_text,
    sample_completions,
)
from preftune.modeling.reference import model_identity
from preftune.onpolicy.config import ROW_SETTINGS, PairsConfig
from preftune.onpolicy.endpoint import EndpointJudge, check_reachable
from preftune.onpolicy.judges import Group, Judge, function_judge
from preftune.onpolicy.prompts import Prompt, load_prompts
from preftune.onpolicy.reward_model import RewardModelJudge
from preftune.onpolicy.select import prompt_rng, select_pairs
from preftune.onpolicy.store import PairsStore
from preftune.onpolicy.summary import format_summary, summarize


@dataclass
class Candidates:
    """One prompt's distinct, non-empty answers, in the order they were first drawn."""

    prompt: Prompt
    answers: list[Completion]
    samples: list[int]  # the sample index (0..K-1) of each answer's first draw
    counts: list[int]  # how many of the K draws gave each answer
    drawn: int  # K
    empty: int = 0  # draws whose text is empty (or only spaces)

    @property
    def cut(self) -> int:
        """Draws cut at max_new_tokens (or the model's last position)."""
        return sum(c for a, c in zip(self.answers, self.counts) if not a.stopped)


@dataclass
class PairsResult:
    output: Path
    summary: dict[str, Any]  # empty on processes other than the first
    rows: int  # pairs in the output


def launch() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun / accelerate launch set them; (0, 1, 0) for one process."""
    return (int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
            int(os.environ.get("LOCAL_RANK", "0")))


def open_judge(cfg: PairsConfig, judge: Judge | Callable[..., Any] | None = None, *, device: str | None = None,
               cache_dir: Path | None = None, cache_file: Path | None = None) -> Judge:
    """The judge `cfg` names (or `judge`, a Judge or a Python function), checked before any model is loaded."""
    if isinstance(judge, Judge):
        return judge
    spec = judge if judge is not None else cfg.judge
    if spec is None:
        check_reachable(cfg.judge_url, timeout=min(cfg.judge_timeout or 5.0, 5.0))
        return EndpointJudge(cfg.judge_url, cfg.judge_model, template=cfg.judge_template, timeout=cfg.judge_timeout,
                             retries=cfg.judge_retries, concurrency=cfg.judge_concurrency, backoff=cfg.judge_backoff,
                             cache=cache_file, cache_dir=cache_dir, api_key_env=cfg.judge_api_key_env)
    if callable(spec):
        return function_judge(spec, judge_type=cfg.judge_type, timeout=cfg.judge_timeout, seed=cfg.seed)
    if not isinstance(spec, str):
        raise PreftuneError(f"judge must be module:function, file.py:function or a reward-model folder, got {spec!r}.")
    if Path(spec).expanduser().is_dir() or (":" not in spec and spec.count("/") == 1):
        return RewardModelJudge(spec, device=device, dtype=cfg.dtype, batch_size=cfg.judge_batch_size,
                                trust_remote_code=cfg.trust_remote_code, allow_pickle=cfg.allow_pickle)
    if ":" not in spec:
        raise PreftuneError(f"the judge {spec!r} is not module:function, file.py:function, nor a reward-model folder "
                            "that exists.")
    return function_judge(spec, judge_type=cfg.judge_type, timeout=cfg.judge_timeout, seed=cfg.seed)


def row_settings(cfg: PairsConfig, judge: Judge) -> dict[str, Any]:
    """What the rows depend on (settings.json): a rerun into the same output must match it."""
    values = {k: getattr(cfg, k) for k in ROW_SETTINGS}
    values["prompts"] = [entry[1:] for entry in source_fingerprint(cfg.prompts)]  # content, not the path's spelling
    values["model"] = model_identity(cfg.model)
    values["judge"] = judge.identity()
    return values


def encode_prompts(tokenizer, prompts: Sequence[Prompt], *, chat: bool = False) -> list[list[int]]:
    """Prompt ids exactly as training encodes the prompt (chat messages through the tokenizer's template)."""
    return [encode_prompt(tokenizer, prompt_text(tokenizer, p.value, chat=chat)) for p in prompts]


def sample_candidates(model, tokenizer, prompts: Sequence[Prompt], ids: Sequence[list[int]], *, samples: int,
                      sampling: Sampling, batch_size: int = 32) -> list[Candidates]:
    """K answers per prompt (streams keyed by the prompt's index), identical ones collapsed."""
    drawn = sample_completions(model, tokenizer, ids, samples=samples, sampling=sampling,
                               keys=[p.index for p in prompts], batch_size=batch_size)
    out = []
    for prompt, answers in zip(prompts, drawn):
        first: dict[str, int] = {}
        cand = Candidates(prompt, [], [], [], len(answers))
        for j, a in enumerate(answers):
            if not a.text.strip():  # `train` refuses an empty answer, so it can be neither side of a pair
                cand.empty += 1
                continue
            key = a.text  # what is judged and written: two token sequences of the same text are one answer
            if key in first:
                cand.counts[first[key]] += 1
                continue
            first[key] = len(cand.answers)
            cand.answers.append(a)
            cand.samples.append(j)
            cand.counts.append(1)
        out.append(cand)
    return out


def judge_candidates(judge: Judge, candidates: Sequence[Candidates], *,
                     missing_eos_penalty: float | None = None) -> list[list[float]]:
    """Each prompt's answer scores (prompts with fewer than two distinct answers are not judged: [])."""
    todo = [c for c in candidates if len(c.answers) >= 2]
    scored = judge.score([Group(c.prompt.value, [a.text for a in c.answers], c.prompt.where, c.prompt.index)
                          for c in todo]) if todo else []
    by_id = {id(c): s for c, s in zip(todo, scored)}
    out = []
    for c in candidates:
        scores = list(by_id.get(id(c), []))
        if missing_eos_penalty:
            scores = [s - missing_eos_penalty * (not a.stopped) for s, a in zip(scores, c.answers)]
        out.append(scores)
    return out


def make_rows(c: Candidates, scores: list[float], cfg: PairsConfig, *, conversational: bool,
              provenance: dict[str, Any]) -> tuple[list[dict], dict]:
    """One prompt's pairs (rows to write) and its done line (what the summary counts)."""
    sel = select_pairs(scores, cfg.select, min_gap=cfg.min_gap, max_pairs=cfg.max_pairs_per_prompt,
                       rng=prompt_rng(cfg.seed, c.prompt.index))
    p = c.prompt

    def side(i: int) -> Any:
        return [{"role": "assistant", "content": c.answers[i].text}] if conversational else c.answers[i].text

    prompt = (p.value if isinstance(p.value, list) else [{"role": "user", "content": p.value}]) \
        if conversational else p.value
    rows = []
    for hi, lo in sel.pairs:
        source = {**provenance, "prompt_index": p.index, "prompt_where": p.where}
        for name, i in (("chosen", hi), ("rejected", lo)):
            source.update({f"{name}_sample": c.samples[i], f"{name}_count": c.counts[i],
                           f"{name}_tokens": c.answers[i].num_tokens, f"{name}_cut": not c.answers[i].stopped})
        rows.append({"prompt": prompt, "chosen": side(hi), "rejected": side(lo), "score_chosen": scores[hi],
                     "score_rejected": scores[lo], "gap": scores[hi] - scores[lo], "source": source})
    done = {"i": p.index, "k": c.drawn, "u": len(c.answers), "empty": c.empty, "cut": c.cut,
            "tokens": sum(a.num_tokens * n for a, n in zip(c.answers, c.counts)),
            "ties": sel.ties, "small_gap": sel.small_gap, "over_cap": sel.over_cap,
            "pairs": [[scores[hi] - scores[lo], c.answers[hi].num_tokens, c.answers[lo].num_tokens]
                      for hi, lo in sel.pairs]}
    return rows, done


def make_pairs(cfg: PairsConfig | None = None, *, judge: Judge | Callable[..., Any] | None = None,
               say: Callable[[str], None] = print, **options: Any) -> PairsResult:
    """`preftune pairs` (see the module docstring): writes cfg.output and its summary; under torchrun each process
    samples and judges its share, and the first gathers the rows. `judge` (a Judge or a Python function) replaces
    cfg.judge; `options` build the PairsConfig when `cfg` is None."""
    if cfg is None:
        cfg = PairsConfig(**({"judge": judge} if judge is not None else {}), **options)
    rank, world, local_rank = launch()
    say = say if rank == 0 else (lambda _: None)
    prompts = load_prompts(cfg.prompts, prompt_field=cfg.prompt_field)
    store = PairsStore(cfg.output, rank, world)
    device = cfg.device or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    judge_obj = open_judge(cfg, judge, device=device, cache_dir=store.state, cache_file=store.judge_cache())
    done = store.open(row_settings(cfg, judge_obj))
    todo = [p for p in prompts.prompts if p.index % world == rank and p.index not in done]
    timing = _sample_and_judge(cfg, judge_obj, todo, store, device, say, world) if todo else {}
    if rank != 0:
        return PairsResult(store.output, {}, 0)
    if not todo and len(done) == len(prompts.prompts):
        say(f"all {len(prompts.prompts):,} prompts of {cfg.prompts} are already in {store.output}")
    if len(store.done()) < len(prompts.prompts):
        say(f"waiting for the other {world - 1} process(es) to finish their prompts")
    done = store.wait_for(len(prompts.prompts))
    n_rows = store.gather(done)
    summary = summarize(list(done.values()), prompts=len(prompts.prompts), repeated=prompts.repeated,
                        model=cfg.model, judge=judge_obj.name, select=cfg.select, min_gap=cfg.min_gap,
                        max_new_tokens=cfg.max_new_tokens, timing=timing, output=str(store.output))
    store.write_summary(summary)
    say(format_summary(summary))
    return PairsResult(store.output, summary, n_rows)


def _sample_and_judge(cfg: PairsConfig, judge: Judge, todo: list[Prompt], store: PairsStore, device: str,
                      say: Callable[[str], None], world: int) -> dict[str, float]:
    """This process's prompts, a batch at a time: sample, judge, select, append. Returns its timings."""
    model, tokenizer = load_model_for_generation(cfg.model, base_model=cfg.base_model, dtype=cfg.dtype,
                                                 device=device, trust_remote_code=cfg.trust_remote_code,
                                                 allow_pickle=cfg.allow_pickle)
    conversational = cfg.chat and getattr(tokenizer, "chat_template", None) is not None
    if cfg.chat and not conversational:
        say("preftune: the tokenizer has no chat template; prompts are used as plain text")
    sampling = Sampling(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                        top_k=cfg.top_k, seed=cfg.seed)
    provenance = {"model": cfg.model, "judge": judge.name, "seed": cfg.seed}
    limit = max_positions(model)
    per = max(1, cfg.batch_size // cfg.samples)
    timing = {"sample_s": 0.0, "judge_s": 0.0, "samples": 0, "tokens": 0}
    desc = "pairs" if world == 1 else f"pairs (process 1 of {world})"
    kept = 0
    with tqdm(total=len(todo), desc=desc, unit="prompt", disable=not cfg.progress or store.rank != 0) as bar:
        for s in range(0, len(todo), per):
            batch = todo[s:s + per]
            ids = encode_prompts(tokenizer, batch, chat=cfg.chat)
            t0 = time.perf_counter()
            cands = sample_candidates(model, tokenizer, batch, ids, samples=cfg.samples, sampling=sampling,
                                      batch_size=cfg.batch_size)
            t1 = time.perf_counter()
            scores = judge_candidates(judge, cands, missing_eos_penalty=cfg.missing_eos_penalty)
            timing["judge_s"] += time.perf_counter() - t1
            timing["sample_s"] += t1 - t0
            rows, lines = [], []
            for c, sc, p_ids in zip(cands, scores, ids):
                if not c.drawn:  # the prompt fills the model's positions: nothing can be sampled
                    lines.append({"i": c.prompt.index, "skip": f"prompt of {len(p_ids)} tokens, model has {limit}"})
                    continue
                r, d = make_rows(c, sc, cfg, conversational=conversational, provenance=provenance)
                rows += r
                lines.append(d)
                timing["samples"] += d["k"]
                timing["tokens"] += d["tokens"]
            store.append(rows, lines)
            kept += len(rows)
            bar.update(len(batch))
            bar.set_postfix(pairs=kept)
    judge.close()
    return timing
