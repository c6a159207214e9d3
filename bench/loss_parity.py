"""10 training steps of each issue-24 loss in preftune and in TRL 1.16, from the same initial weights, data and
learning rate: does a user switching over see the same training?

    python bench/loss_parity.py                       # every row below, 10 steps each
    python bench/loss_parity.py --only orpo,cpo       # rows whose label starts with one of these
    python bench/loss_parity.py --json bench/results/loss-parity-DATE.json

Set-up (both tools): the fixture's tiny Llama (bench/fixture.py, preset "tiny": 2 layers, hidden 64, vocab 4,096,
random init, fp32) and its BPE tokenizer; 8 pairs trained as one full batch of 8 for 10 steps (so the data
order cannot differ), AdamW lr 5e-4 constant without warmup, weight decay 0, gradient clipping 1.0, β 0.1,
dropout off, reference log-probs precomputed (DPO family; TR-DPO: a live copy in both), no gradient checkpointing,
no bf16, CPU.
TRL: DPOTrainer, and the experimental ORPOTrainer and CPOTrainer. Every prompt starts with the BOS text "<s>",
so both tools see the same ids (TRL's ORPO and CPO prepend BOS where it is missing, preftune and TRL's DPO do not).

Data sets (answers are built to an exact token count; EOS is appended by both tools):
    varied   prompts of 10-14 tokens after BOS, chosen and rejected answers of 5-11 tokens
    equal    the same prompts, every chosen answer 8 tokens (rejected still 5-11)
    aligned  the prompt is BOS alone, every chosen answer 8 tokens
    unpaired   varied's 8 pairs as 16 examples (chosen: label true, rejected: false), each pair's two adjacent
    shuffled   the same 16 examples in a shuffled order
    one-prompt the same answers, every example with the first prompt

The table: loss at steps 1 and 10 in each tool, the largest |difference| over the 10 steps, and the difference of
the step-1 mean chosen log-prob (0 when both tools tokenized alike; ORPO logs it length-averaged, preftune summed,
so that column is left out for ORPO).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import fixture  # noqa: E402

STEPS, BATCH, LR, BETA = 10, 8, 5e-4, 0.1

# (label, data set, preftune options, TRL trainer, TRL config options)
ROWS = [
    ("sigmoid (baseline)", "varied", {}, "dpo", {}),
    ("exo_pair, ε 1e-3", "varied", {"loss": "exo_pair", "label_smoothing": 1e-3}, "dpo",
     {"loss_type": ["exo_pair"], "label_smoothing": 1e-3}),
    ("sppo_hard", "varied", {"loss": "sppo_hard"}, "dpo", {"loss_type": ["sppo_hard"]}),
    ("aot", "varied", {"loss": "aot"}, "dpo", {"loss_type": ["aot"]}),
    ("aot_unpaired", "varied", {"loss": "aot_unpaired"}, "dpo", {"loss_type": ["aot_unpaired"]}),
    ("discopop, τ 0.05", "varied", {"loss": "discopop"}, "dpo", {"loss_type": ["discopop"]}),
    ("sigmoid, forward_kl", "varied", {"f_divergence_type": "forward_kl"}, "dpo",
     {"f_divergence_type": "forward_kl"}),
    ("sigmoid, js_divergence", "varied", {"f_divergence_type": "js_divergence"}, "dpo",
     {"f_divergence_type": "js_divergence"}),
    ("sigmoid, alpha_divergence α 0.5", "varied", {"f_divergence_type": "alpha_divergence"}, "dpo",
     {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.5}),
    ("sigmoid, alpha_divergence α 0.3 (TRL's 0.7)", "varied",
     {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3}, "dpo",
     {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.7}),
    ("ipo, js_divergence", "varied", {"loss": "ipo", "f_divergence_type": "js_divergence"}, "dpo",
     {"loss_type": ["ipo"], "f_divergence_type": "js_divergence"}),
    ("orpo λ 0.1", "varied", {"loss": "orpo"}, "orpo", {}),
    ("orpo λ 0.1", "aligned", {"loss": "orpo"}, "orpo", {}),
    ("cpo", "varied", {"loss": "cpo"}, "cpo", {}),
    ("cpo", "equal", {"loss": "cpo"}, "cpo", {}),
    ("sigmoid, WPO", "varied", {"use_weighting": True}, "dpo", {"use_weighting": True}),
    ("ipo, WPO", "varied", {"loss": "ipo", "use_weighting": True}, "dpo", {"loss_type": ["ipo"], "use_weighting": True}),
    ("sigmoid, LD-DPO α 0.5", "varied", {"ld_alpha": 0.5}, "dpo", {"ld_alpha": 0.5}),
    ("sigmoid, LD-DPO α 0.5 + WPO", "varied", {"ld_alpha": 0.5, "use_weighting": True}, "dpo",
     {"ld_alpha": 0.5, "use_weighting": True}),
    ("sigmoid, TR-DPO α 0.6 τ 3", "varied", {"sync_ref_model": True, "ref_model_sync_steps": 3}, "dpo",
     {"sync_ref_model": True, "ref_model_sync_steps": 3}),
    ("sigmoid, TR-DPO α 1 τ 2 (hard)", "varied",
     {"sync_ref_model": True, "ref_model_mixup_alpha": 1.0, "ref_model_sync_steps": 2}, "dpo",
     {"sync_ref_model": True, "ref_model_mixup_alpha": 1.0, "ref_model_sync_steps": 2}),
    # Unpaired: the 16 examples of 8 pairs in one global batch of 16 (TRL: sequential sampling, as its KTO needs).
    ("kto", "one-prompt", {"loss": "kto", "batch_size": 16}, "kto", {"per_device_train_batch_size": 16}),
    ("kto", "unpaired", {"loss": "kto", "batch_size": 16}, "kto", {"per_device_train_batch_size": 16}),
    ("kto", "shuffled", {"loss": "kto", "batch_size": 16}, "kto", {"per_device_train_batch_size": 16}),
    ("kto, λ_D 1.5 λ_U 0.7", "unpaired", {"loss": "kto", "batch_size": 16, "desirable_weight": 1.5,
                                          "undesirable_weight": 0.7}, "kto",
     {"per_device_train_batch_size": 16, "desirable_weight": 1.5, "undesirable_weight": 0.7}),
    ("apo_zero_unpaired", "unpaired", {"loss": "apo_zero_unpaired", "batch_size": 16}, "kto",
     {"per_device_train_batch_size": 16, "loss_type": "apo_zero_unpaired"}),
]


def _answer(tokenizer, source: fixture.TextSource, rng: random.Random, n_tokens: int) -> str:
    """' w1 w2 ...' of exactly `n_tokens` tokens (words are drawn until a draw lands on the count)."""
    while True:
        words: list[str] = []
        while True:
            text = " " + " ".join(words)
            count = len(tokenizer(text, add_special_tokens=False)["input_ids"]) if words else 0
            if count >= n_tokens:
                break
            words.append(rng.choices(source.words, weights=source.weights, k=1)[0])
        if count == n_tokens:
            return text


def make_sets(tokenizer, seed: int = 7) -> dict[str, list[dict]]:
    source, rng = fixture.TextSource(seed=0), random.Random(seed)
    prompts = ["<s>" + _answer(tokenizer, source, rng, rng.randint(10, 14)) for _ in range(BATCH)]
    rejected = [_answer(tokenizer, source, rng, rng.randint(5, 11)) for _ in range(BATCH)]
    varied = [_answer(tokenizer, source, rng, rng.randint(5, 11)) for _ in range(BATCH)]
    equal = [_answer(tokenizer, source, rng, 8) for _ in range(BATCH)]
    def unpaired(ps: list[str]) -> list[dict]:
        return [dict(prompt=p, completion=a, label=lab) for p, c, r in zip(ps, varied, rejected)
                for a, lab in ((c, True), (r, False))]

    return {"varied": [dict(prompt=p, chosen=c, rejected=r) for p, c, r in zip(prompts, varied, rejected)],
            "equal": [dict(prompt=p, chosen=c, rejected=r) for p, c, r in zip(prompts, equal, rejected)],
            "aligned": [dict(prompt="<s>", chosen=c, rejected=r) for c, r in zip(equal, rejected)],
            "unpaired": unpaired(prompts), "one-prompt": unpaired([prompts[0]] * BATCH),
            "shuffled": random.Random(1).sample(unpaired(prompts), 2 * BATCH)}


def run_preftune(model_dir: Path, data: Path, out: Path, options: dict) -> dict:
    from preftune import TrainConfig, train
    from preftune.outputs.metrics import read_metrics

    cfg = TrainConfig(**{**dict(model=str(model_dir), data=str(data), output_dir=str(out), max_steps=STEPS,
                                 batch_size=BATCH, learning_rate=LR, beta=BETA, lr_scheduler="constant",
                                 warmup_ratio=0.0, max_length=256, max_prompt_length=128, progress=False,
                                 logging_steps=1, dtype="float32", seed=0), **options})
    train(cfg)
    rows = [r for r in read_metrics(out) if r["split"] == "train"]
    return {"losses": [r["loss"] for r in rows], "logps_chosen_1": rows[0]["logps/chosen"],
            "kl": [r.get("kl") for r in rows]}


def run_trl(model_dir: Path, data: Path, out: Path, trainer: str, options: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    kept: list[dict] = []

    class Keep(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                kept.append(dict(logs))

    common = dict(output_dir=str(out), per_device_train_batch_size=BATCH, max_steps=STEPS, learning_rate=LR,
                  beta=BETA, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
                  max_length=256, report_to="none", logging_steps=1, save_strategy="no", disable_tqdm=True,
                  dataloader_num_workers=0, seed=0, data_seed=0, use_cpu=True, bf16=False, fp16=False,
                  gradient_checkpointing=False)
    if trainer == "dpo":
        from trl import DPOConfig as Config
        from trl import DPOTrainer as Trainer
        # TR-DPO's reference moves, so TRL (like preftune) refuses to precompute it: a live copy then.
        common.update(precompute_ref_log_probs=not options.get("sync_ref_model", False), padding_free=False)
    elif trainer == "kto":
        from trl import KTOConfig as Config
        from trl import KTOTrainer as Trainer
        # its KL completions are rotated within each batch of the data set's order: sequential sampling
        common.update(precompute_ref_log_probs=True, train_sampling_strategy="sequential")
    elif trainer == "orpo":
        from trl.experimental.orpo import ORPOConfig as Config
        from trl.experimental.orpo import ORPOTrainer as Trainer
    else:
        from trl.experimental.cpo import CPOConfig as Config
        from trl.experimental.cpo import CPOTrainer as Trainer
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = [json.loads(ln) for ln in data.read_text(encoding="utf-8").splitlines() if ln.strip()]
    t = Trainer(model=model, args=Config(**{**common, **options}), train_dataset=Dataset.from_list(rows),
                processing_class=tok, callbacks=[Keep()])
    t.train()
    return {"losses": [row["loss"] for row in kept], "logps_chosen_1": kept[0].get("logps/chosen"),
            "kl": [row.get("kl") for row in kept]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", help="comma-separated label prefixes to run")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    import datasets
    import torch
    import transformers
    import trl

    datasets.disable_progress_bars()
    transformers.utils.logging.set_verbosity_error()

    fx = fixture.build({}, model=fixture.PRESETS["tiny"], log=lambda m: print(m, flush=True))
    from transformers import AutoTokenizer

    sets = make_sets(AutoTokenizer.from_pretrained(fx.model_dir))
    rows = [r for r in ROWS if not args.only or any(r[0].startswith(p) for p in args.only.split(","))]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for name, pairs in sets.items():
            files[name] = Path(tmp) / f"{name}.jsonl"
            files[name].write_text("".join(json.dumps(p) + "\n" for p in pairs), encoding="utf-8")
        for i, (label, data, ours, trainer, theirs) in enumerate(rows):
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):  # both tools' own progress lines
                a = run_preftune(fx.model_dir, files[data], Path(tmp) / f"p{i}", ours)
                b = run_trl(fx.model_dir, files[data], Path(tmp) / f"t{i}", trainer, theirs)
            diffs = [abs(x - y) for x, y in zip(a["losses"], b["losses"])]
            same_ids = None if trainer == "orpo" else a["logps_chosen_1"] - b["logps_chosen_1"]
            results.append({"label": label, "data": data, "preftune": a, "trl": b, "max_abs_diff": max(diffs),
                            "logps_chosen_1_diff": same_ids, "seconds": time.perf_counter() - t0})
            print(f"{label} [{data}]: preftune {a['losses'][0]:.6f} → {a['losses'][-1]:.6f}, TRL "
                  f"{b['losses'][0]:.6f} → {b['losses'][-1]:.6f}, max |Δ| {max(diffs):.2e}", flush=True)
    print("\n| loss | data | step 1 preftune | step 1 TRL | step 10 preftune | step 10 TRL | max \\|Δ loss\\| "
          "| Δ logps/chosen step 1 |\n|---|---|---|---|---|---|---|---|")
    for r in results:
        a, b, d = r["preftune"]["losses"], r["trl"]["losses"], r["logps_chosen_1_diff"]
        print(f"| {r['label']} | {r['data']} | {a[0]:.6f} | {b[0]:.6f} | {a[-1]:.6f} | {b[-1]:.6f} | "
              f"{r['max_abs_diff']:.1e} | {'—' if d is None else f'{d:.1e}'} |")
    if args.json:
        meta = {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
                "python": platform.python_version(), "steps": STEPS, "batch": BATCH, "lr": LR, "beta": BETA,
                "pairs": sets}
        Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=1))


if __name__ == "__main__":
    main()
