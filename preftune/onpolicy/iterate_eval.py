"""The held-out evaluation of `preftune iterate`: what a round's model writes on prompts it never trained on, judged.

For a model and the held-out prompts (`evaluate_answers`):

- its greedy answers (`sample_completions` at temperature 0, as `preftune pairs` samples), judged: the mean score
  and, with `good_score`, the share at or above it (pointwise judges; a pairwise judge only compares);
- one answer per prompt sampled at temperature 1 with no other warping (the model's own distribution), judged the
  same way, and scored under the model and under each model in `kl_to` (the first model, the round's start):
  KL(model ‖ other) per token ≈ Σ (log π(y) − log π_other(y)) / Σ |y| over those samples (`evaluate.kl_metrics`:
  the estimator `preftune eval` reports, exact sampled token ids, a closing EOS counted).

`compare` turns two models' answers to the same prompts into a win rate with its 95% Wilson interval
(`judging.win_rate`, ties half a win): from the scores for a pointwise judge (no new calls), else by asking the
pairwise judge about each pair (which answer is shown first is its seeded coin); identical answers tie.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from typing import Any

import torch

from preftune.evaluate import kl_metrics
from preftune.generate import Sampling, load_model_for_generation, sample_completions
from preftune.judging import win_rate
from preftune.onpolicy.iterate_config import IterateConfig
from preftune.onpolicy.judges import Group, Judge
from preftune.onpolicy.pairs import encode_prompts
from preftune.onpolicy.prompts import Prompt
from preftune.scoring import score_ids


def pointwise(judge: Judge) -> bool:
    """Whether the judge scores one answer on its own (all kinds but a pairwise function)."""
    return judge.kind != "pairwise"


def _load(path: str, cfg: IterateConfig, device: str):
    return load_model_for_generation(path, dtype=cfg.dtype, device=device, trust_remote_code=cfg.trust_remote_code,
                                     allow_pickle=cfg.allow_pickle)


def _free(model) -> None:
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def evaluate_answers(model_path: str, prompts: Sequence[Prompt], judge: Judge, cfg: IterateConfig, *, device: str,
                     kl_to: dict[str, str] | None = None) -> dict[str, Any]:
    """Greedy and sampled answers of `model_path` to `prompts`, judged, and KL to each model in `kl_to` (name →
    path); see the module docstring. One model is in memory at a time."""
    model, tok = _load(model_path, cfg, device)
    ids = encode_prompts(tok, prompts, chat=cfg.chat)
    keys = [p.index for p in prompts]
    draw = dict(samples=1, keys=keys, batch_size=cfg.sample_batch_size)
    greedy = sample_completions(model, tok, ids, sampling=Sampling(cfg.max_new_tokens, temperature=0.0), **draw)
    sampled = sample_completions(model, tok, ids, sampling=Sampling(cfg.max_new_tokens, temperature=1.0,
                                                                    seed=cfg.seed), **draw)
    kept = [i for i, s in enumerate(sampled) if s]  # a prompt that fills the model's positions gets no answer
    answer_ids = [sampled[i][0].ids for i in kept]
    prompt_ids = [ids[i] for i in kept]
    out: dict[str, Any] = {"model": str(model_path), "prompts": len(prompts)}
    if kept:
        own, lengths = score_ids(model, prompt_ids, answer_ids, pad_id=tok.pad_token_id,
                                 batch_size=cfg.sample_batch_size)
    _free(model)
    scored: dict[str, torch.Tensor] = {}
    for name, path in (kl_to or {}).items():
        if path not in scored and kept:
            other, _ = _load(path, cfg, device)
            scored[path] = score_ids(other, prompt_ids, answer_ids, pad_id=tok.pad_token_id,
                                     batch_size=cfg.sample_batch_size)[0]
            _free(other)
        if kept:
            out[f"kl_{name}"] = kl_metrics(own, scored[path], lengths)
    texts = {"greedy": [a[0].text if a else "" for a in greedy], "samples": [a[0].text if a else "" for a in sampled]}
    scores = _scores(judge, prompts, texts) if pointwise(judge) else {k: None for k in texts}
    for kind, answers in texts.items():
        out[kind] = {"texts": answers, "scores": scores[kind],
                     "tokens": [a[0].num_tokens if a else 0 for a in (greedy if kind == "greedy" else sampled)],
                     **score_summary(scores[kind], cfg.good_score)}
    return out


def _scores(judge: Judge, prompts: Sequence[Prompt], texts: dict[str, list[str]]) -> dict[str, list[float]]:
    """A pointwise judge's scores of each prompt's greedy and sampled answer (one request per prompt)."""
    groups = [Group(p.value, [texts["greedy"][i], texts["samples"][i]], p.where, p.index)
              for i, p in enumerate(prompts)]
    both = judge.score(groups)
    return {"greedy": [s[0] for s in both], "samples": [s[1] for s in both]}


def score_summary(scores: Sequence[float] | None, good_score: float | None) -> dict[str, Any]:
    """The mean judged score and (with `good_score`) the share of answers at or above it."""
    if not scores:
        return {"score_mean": None, "good_share": None}
    good = None if good_score is None else sum(s >= good_score for s in scores) / len(scores)
    return {"score_mean": sum(scores) / len(scores), "good_share": good}


def compare(judge: Judge, prompts: Sequence[Prompt], mine: dict[str, Any], theirs: dict[str, Any]) -> dict[str, Any]:
    """Win rate of answers `mine` over `theirs` (each {"texts", "scores"}) on the same prompts; see the module
    docstring. A pairwise judge's coin is keyed by its seed and the prompt, so a rerun asks the same questions."""
    if pointwise(judge):
        verdicts = ["model" if a > b else "reference" if a < b else "tie"
                    for a, b in zip(mine["scores"], theirs["scores"])]
        return win_rate(verdicts)
    asked = [(p, a, b) for p, a, b in zip(prompts, mine["texts"], theirs["texts"]) if a != b]
    points = judge.score([Group(p.value, [a, b], p.where, p.index) for p, a, b in asked]) if asked else []
    verdicts = ["tie"] * (len(prompts) - len(asked))
    verdicts += ["model" if x > y else "reference" if x < y else "tie" for x, y in points]
    return win_rate(verdicts)
