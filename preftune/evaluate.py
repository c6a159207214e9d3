"""`preftune eval`: did preference tuning help, and at what cost?

On held-out preference pairs and their prompts, for a model M and its reference R:

- preference accuracy of DPO's implicit reward r(x, y) = β·(log π_M(y|x) − log π_R(y|x)) (Rafailov et al.,
  2023, eq. 5): a pair is ranked right when r(chosen) > r(rejected) (a tie counts as wrong, as in training);
  the margins r(chosen) − r(rejected) with their quantiles and histogram; mean log-probs of both answers
  under both models (chosen falling under M is the failure `preftune report` flags during training);
- KL(π_M ‖ π_R) per token, a Monte-Carlo estimate on M's own samples y ~ π_M(·|x) (temperature 1, no
  other logits processing; the exact sampled token ids are scored, not a re-tokenization):
      KL ≈ Σ_i [log π_M(y_i|x_i) − log π_R(y_i|x_i)] / Σ_i |y_i|      (|y_i| counts a closing EOS)
- answer length before/after: M's and R's answers to the same prompts (decoded as asked, greedy by default);
- with a judge (see preftune.judging for the protocol), those answers side by side, the win rate of M over R
  and its 95% Wilson interval.

    from preftune.evaluate import evaluate, run_eval
    result = run_eval("runs/dpo/final", "heldout.jsonl")            # reference and β read from the run folder
    result = evaluate(model, tokenizer, records, reference=ref_model, beta=0.1, judge="my_judges:pairwise")

Everything is batched through preftune.scoring (the loop training and `inspect` use) and preftune.generate.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from preftune.config import read_yaml
from preftune.data.load import load_records
from preftune.data.render import render_texts
from preftune.data.stats import histogram
from preftune.device import forward_handle
from preftune.errors import PreftuneError
from preftune.generate import encode_prompt, generate_ids, load_model_for_generation
from preftune.generate import generate as sample
from preftune.judging import judge_pairs, load_judge, wilson_interval, win_rate
from preftune.modeling.load import resolve_model_path
from preftune.modeling.reference import model_identity
from preftune.options import BETA, check_value
from preftune.outputs.files import write_output
from preftune.outputs.run_dir import RunDir
from preftune.scoring import score_ids, score_records

QUANTILES = (("p5", 0.05), ("p25", 0.25), ("median", 0.5), ("p75", 0.75), ("p95", 0.95))


def describe(values: Sequence[float]) -> dict[str, float]:
    """count, mean, std (population), min, p5..p95 (linear interpolation, numpy's default), max."""
    t = torch.as_tensor(list(values), dtype=torch.float64)
    if t.numel() == 0:
        return {"count": 0}
    q = torch.quantile(t, torch.tensor([p for _, p in QUANTILES], dtype=torch.float64)).tolist()
    return {"count": t.numel(), "mean": float(t.mean()), "std": float(t.std(unbiased=False)),
            "min": float(t.min()), **{name: v for (name, _), v in zip(QUANTILES, q)}, "max": float(t.max())}


def preference_metrics(model_scores: dict, reference_scores: dict, beta: float) -> dict[str, Any]:
    """Implicit-reward accuracy and margins from `score_records` outputs of M and R on the same pairs."""
    mc, mr = model_scores["chosen_logps"].double(), model_scores["rejected_logps"].double()
    rc, rr = reference_scores["chosen_logps"].double(), reference_scores["rejected_logps"].double()
    chosen_reward, rejected_reward = beta * (mc - rc), beta * (mr - rr)
    margin = chosen_reward - rejected_reward
    n = margin.numel()
    right = int((margin > 0).sum())
    mean = (lambda t: float(t.mean())) if n else (lambda t: float("nan"))
    return {
        "pairs": n,
        "accuracy": right / n if n else float("nan"),
        "accuracy_ci95": list(wilson_interval(right, n)),
        "margin": describe(margin.tolist()),
        "margin_histogram": histogram(margin.tolist(), bins=20),
        "reward_chosen_mean": mean(chosen_reward),
        "reward_rejected_mean": mean(rejected_reward),
        "logps": {"model": {"chosen": mean(mc), "rejected": mean(mr)},
                  "reference": {"chosen": mean(rc), "rejected": mean(rr)}},
        "likelihood_prefers_chosen": {"model": mean((mc > mr).double()), "reference": mean((rc > rr).double())},
    }


def kl_metrics(model_logps: torch.Tensor, reference_logps: torch.Tensor, lengths: torch.Tensor) -> dict[str, Any]:
    """Per-token and per-sequence Monte-Carlo KL(π_M ‖ π_R) from the summed log-probs of M's samples."""
    diff = (model_logps.double() - reference_logps.double())
    n = diff.numel()
    stderr = float(diff.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
    return {"per_token": float(diff.sum() / lengths.double().sum()) if n else float("nan"),
            "per_sequence": float(diff.mean()) if n else float("nan"), "per_sequence_stderr": stderr,
            "samples": n, "tokens": int(lengths.sum()),
            "method": "Monte-Carlo on the model's own samples (temperature 1, no top-k/top-p), exact token ids"}


def length_metrics(completions: Sequence) -> dict[str, Any]:
    toks = [c.num_tokens for c in completions]
    words = [len(c.text.split()) for c in completions]
    n = max(len(toks), 1)
    return {"tokens_mean": sum(toks) / n, "tokens_median": describe(toks).get("median", float("nan")),
            "words_mean": sum(words) / n, "stopped_share": sum(c.stopped for c in completions) / n}


class _Reference:
    """The reference as something to score or sample with: a model of its own, or M's base with its LoRA
    adapters switched off (a LoRA run's reference, at no extra memory)."""

    def __init__(self, model, reference):
        if reference is None and not hasattr(model, "disable_adapter"):
            raise PreftuneError("no reference model given; pass the model M was trained from (--reference), "
                                "or a LoRA adapter folder, whose base is the reference.")
        self.model = model if reference is None else reference
        self.context = model.disable_adapter if reference is None else contextlib.nullcontext


def evaluate(model, tokenizer, records: Sequence[dict], *, reference=None, beta: float = BETA.default, judge=None,
             generate: int = 32, kl_samples: int = 32, max_new_tokens: int = 128, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, batch_size: int = 8, max_length: int = 1024,
             max_prompt_length: int = 512) -> dict[str, Any]:
    """The figures described in the module docstring for loaded models, as a JSON-ready dict.

    `records`: preference records as `preftune.data.load.load_records` returns them. `reference`: a model
    (sharing M's tokenizer) or None when M is a peft model (its base is the reference). `judge`: a callable
    or "module:function" (see preftune.judging). `generate`: prompts answered by both models (0: none);
    `kl_samples`: prompts M samples once each for the KL estimate (0: none); `temperature` and `top_p`
    decode the side-by-side answers (0 = greedy).
    """
    beta = check_value("beta", "float", BETA, beta)  # the schema's check, as for `train --beta`
    judge_fn = load_judge(judge) if judge is not None else None
    if judge_fn is not None and generate < 1:
        raise PreftuneError("a judge needs answers to compare; pass --generate N with N >= 1.")
    ref = _Reference(model, reference)
    t0 = time.time()
    # Each model's forward plan is decided once (device.plan_forward) and every score below runs it.
    m_handle = forward_handle(model)
    r_handle = m_handle if ref.model is model else forward_handle(ref.model)
    kw = dict(max_length=max_length, max_prompt_length=max_prompt_length, batch_size=batch_size)
    m_scores = score_records(m_handle, tokenizer, records, **kw)
    with ref.context():
        r_scores = score_records(r_handle, tokenizer, records, **kw)
    result: dict[str, Any] = {"beta": beta, "records": len(records),
                              "preference": preference_metrics(m_scores, r_scores, beta)}

    # Unique prompts in data order: one sample per prompt, whatever the number of pairs sharing it.
    firsts: dict[str, Any] = {}
    for r in records:
        firsts.setdefault(render_texts(tokenizer, r)[0], r["prompt"])
    texts, raw_prompts = list(firsts), list(firsts.values())
    result["prompts"] = len(texts)

    if kl_samples > 0:
        ids = [encode_prompt(tokenizer, t) for t in texts[:kl_samples]]
        outs = generate_ids(model, tokenizer, ids, max_new_tokens=max_new_tokens, temperature=1.0, seed=seed,
                            batch_size=batch_size, pure=True)
        answers = [a for a, _ in outs]
        lp_m, n_tok = score_ids(m_handle, ids, answers, pad_id=tokenizer.pad_token_id, batch_size=batch_size)
        with ref.context():
            lp_r, _ = score_ids(r_handle, ids, answers, pad_id=tokenizer.pad_token_id, batch_size=batch_size)
        result["kl"] = kl_metrics(lp_m, lp_r, n_tok)

    if generate > 0:
        dec = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                   batch_size=batch_size)
        prompts = raw_prompts[:generate]
        mine = sample(model, tokenizer, prompts, **dec)
        with ref.context():
            theirs = sample(ref.model, tokenizer, prompts, **dec)
        result["lengths"] = {"prompts": len(prompts), "model": length_metrics(mine),
                             "reference": length_metrics(theirs),
                             "decoding": {"temperature": temperature, "top_p": top_p,
                                          "max_new_tokens": max_new_tokens, "seed": seed}}
        if judge_fn is not None:
            rows = judge_pairs(judge_fn, prompts, [c.text for c in mine], [c.text for c in theirs], seed=seed)
            result["judge"] = {"name": judge if isinstance(judge, str) else _qualname(judge_fn),
                               **win_rate([r["verdict"] for r in rows])}
            result["side_by_side"] = rows
        else:
            result["side_by_side"] = [{"prompt": p, "model": a.text, "reference": b.text}
                                      for p, a, b in zip(prompts, mine, theirs)]
    result["seconds"] = round(time.time() - t0, 2)
    return result


def _qualname(func) -> str:
    return f"{getattr(func, '__module__', '?')}:{getattr(func, '__qualname__', '?')}"


def run_config(model: str) -> tuple[Path | None, dict[str, Any]]:
    """(run folder, its config.yaml) when `model` is a run's final/ folder, else (None, {})."""
    folder = Path(model).expanduser()
    cfg_file = folder.parent / "config.yaml"
    if folder.name != "final" or not cfg_file.is_file():
        return None, {}
    try:
        cfg = read_yaml(cfg_file)  # bounded like any config (a YAML alias bomb is refused)
    except PreftuneError:
        return None, {}
    return folder.parent, cfg


def check_run_model(run_dir: Path, key: str, path: str, flag: str) -> None:
    """`path`, taken from the run's config (`key`: model or reference_model), must still hold the model the run
    loaded under that name (its identity, recorded in the run folder's mark): else the implicit reward would
    compare against another model. Runs that recorded nothing are not checked."""
    recorded = RunDir(run_dir).recorded("models")
    was = recorded.get(key) if isinstance(recorded, dict) else None
    if not isinstance(was, dict) or not isinstance(was.get("identity"), str):
        return
    local = Path(path).expanduser()
    now = model_identity(str(local) if local.exists() else resolve_model_path(path))
    if now == was["identity"]:
        return
    try:
        a, b = json.loads(was["identity"]), json.loads(now)
        what = ", ".join(sorted(k for k in {*a, *b} if a.get(k) != b.get(k))[:4]) + " changed"
    except (ValueError, AttributeError, TypeError):
        what = "it is not the same model"
    raise PreftuneError(f"the run in {run_dir} was trained with {path} as its {key.replace('_', ' ')}, but that "
                        f"path now holds another model ({what}); pass {flag} with the model the run was trained "
                        "with.")


def run_eval(model: str, data: Any, *, reference: str | None = None, base_model: str | None = None,
             beta: float | None = None, output: str | Path | None = None, dtype: str = "float32",
             device: str | None = None, format: str = "auto", prompt_field: str = "prompt",
             chosen_field: str = "chosen", rejected_field: str = "rejected", **options: Any) -> dict[str, Any]:
    """`preftune eval`: load M (a folder, hub name or LoRA adapter folder), its reference and the held-out
    pairs, run `evaluate`, write the JSON to `output` and return it.

    For a run's final/ folder the defaults come from the run: reference = its reference_model or starting
    model (the base under the adapters for a LoRA run), β = its beta, output = RUN/eval.json.
    """
    for name, value in (("model", model), ("reference", reference), ("base_model", base_model), ("output", output)):
        if not isinstance(value, (str, os.PathLike)) and (value is not None or name == "model"):
            raise PreftuneError(f"run_eval: {name} must be a path or a hub name, got {type(value).__name__}.")
    model = str(model)
    run_dir, cfg = run_config(model)
    # the run folder's eval.json is written like every run file: refused now, before anything loads
    owner = (RunDir.existing(run_dir, "eval", "pass --output to write the result elsewhere")
             if output is None and run_dir is not None else None)
    adapter = (Path(model).expanduser() / "adapter_config.json").is_file()
    if cfg and base_model is None and adapter and cfg.get("model"):  # the run's base, by its recorded path
        base_model = cfg["model"]
        check_run_model(run_dir, "model", base_model, "--base-model")
    if reference is None and cfg:  # the run's reference: its reference_model, else what it started from
        key = "reference_model" if cfg.get("reference_model") else None if adapter else "model"
        reference = cfg.get(key) if key else None
        if reference:
            check_run_model(run_dir, key, reference, "--reference")
    beta = beta if beta is not None else cfg.get("beta", BETA.default)
    for key in ("max_length", "max_prompt_length"):
        if key in cfg and key not in options:
            options[key] = cfg[key]
    loaded = load_records(data, format=format, prompt_field=prompt_field, chosen_field=chosen_field,
                          rejected_field=rejected_field)
    m, tok = load_model_for_generation(model, base_model=base_model, dtype=dtype, device=device)
    ref_model = None
    if reference is not None:
        ref_model, ref_tok = load_model_for_generation(reference, dtype=dtype, device=device)
        if ref_tok.get_vocab() != tok.get_vocab():
            raise PreftuneError(f"the reference {reference} has another vocabulary than {model}; DPO's reward "
                                "compares the two models on the same tokens, so pass the model M was trained from.")
    result = evaluate(m, tok, loaded.records, reference=ref_model, beta=beta, **options)
    result = {"model": str(model), "reference": str(reference) if reference else "base model (adapters off)",
              "data": loaded.sources, **result}
    text = json.dumps(result, indent=2, ensure_ascii=False) + "\n"
    if owner is not None:
        owner.write_text(owner.path / "eval.json", text)
        result["output"] = str(owner.path / "eval.json")
    elif output is not None:
        result["output"] = str(write_output(output, text, "the eval result"))
    return result


def format_eval(result: dict[str, Any]) -> str:
    """The terminal table of an eval result."""
    p = result["preference"]
    pct = lambda x: f"{100 * x:5.1f}%"  # noqa: E731
    lo, hi = p["accuracy_ci95"]
    lines = [f"eval of {result.get('model', 'the model')} against {result.get('reference', 'the reference')} "
             f"(beta {result['beta']}): {p['pairs']} held-out pairs, {result.get('prompts', 0)} prompts",
             f"  preference accuracy (implicit reward)   {pct(p['accuracy'])}   95% CI {pct(lo)} .. {pct(hi)}"]
    if p["pairs"]:
        m = p["margin"]
        lines.append(f"  reward margin  mean {m['mean']:+.4f}  median {m['median']:+.4f}  p5 {m['p5']:+.4f}  "
                     f"p95 {m['p95']:+.4f}")
        lines.append(f"  reward chosen {p['reward_chosen_mean']:+.4f}   rejected {p['reward_rejected_mean']:+.4f}")
        lines.append("                                     model   reference")
        for side in ("chosen", "rejected"):
            lines.append(f"  mean log p({side:8s})            {p['logps']['model'][side]:9.3f}   "
                         f"{p['logps']['reference'][side]:9.3f}")
        lk = p["likelihood_prefers_chosen"]
        lines.append(f"  likelihood prefers chosen           {pct(lk['model'])}      {pct(lk['reference'])}")
    if "lengths" in result:
        lm, lr = result["lengths"]["model"], result["lengths"]["reference"]
        lines.append(f"  answer length, tokens (mean)        {lm['tokens_mean']:7.1f}     {lr['tokens_mean']:7.1f}")
        lines.append(f"  answer length, words (mean)         {lm['words_mean']:7.1f}     {lr['words_mean']:7.1f}")
        lines.append(f"  answers that ended (EOS)            {pct(lm['stopped_share'])}      "
                     f"{pct(lr['stopped_share'])}")
    if "kl" in result:
        k = result["kl"]
        lines.append(f"  KL(model || reference) per token    {k['per_token']:.4f} nats on {k['samples']} samples "
                     f"({k['tokens']} tokens); per answer {k['per_sequence']:.3f} ± {k['per_sequence_stderr']:.3f}")
    if "judge" in result:
        j = result["judge"]
        lo, hi = j["ci95"]
        lines.append(f"  judge {j['name']}: win rate {pct(j['win_rate'])} (95% Wilson {pct(lo)} .. {pct(hi)}); "
                     f"{j['wins']} wins, {j['losses']} losses, {j['ties']} ties")
    if result.get("output"):
        lines.append(f"written: {result['output']}")
    return "\n".join(lines)
