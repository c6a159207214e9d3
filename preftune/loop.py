"""The training loop, shared by DPO-family runs (`train`) and supervised fine-tuning (`sft`).

Read top to bottom, `run` is: config → run folder → data (load, validate, tokenize) → model (+ LoRA)
→ reference → optimizer and schedule → loop (micro-batches, loss, backward, clip, step, log, evaluate,
checkpoint) → final model. Assumptions: a causal LM from transformers; one process or several launched
by `accelerate launch` (each takes its share of every global batch); dropout off unless asked for.
"""

from __future__ import annotations

import contextlib
import math
import random
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from preftune.config import TrainConfig, check_keys
from preftune.data.collate import collate
from preftune.data.sampler import micro_batches
from preftune.data.splits import load_splits
from preftune.device import cpu_threads, plan_forward
from preftune.errors import PreftuneError
from preftune.logprobs import LogpsModel
from preftune.losses import RewardShift, nll_loss, preference_loss
from preftune.modeling import reference as refs
from preftune.modeling.load import add_lora, disable_dropout, load_model, load_tokenizer, resolve_model_path
from preftune.outputs.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint, save_final
from preftune.outputs.metrics import MetricsWriter

# What --overwrite replaces. reference_logps/ stays: its files are keyed by model, token ids and precision,
# so a rerun can only ever reuse a matching one.
RUN_FILES = ("config.yaml", "metrics.jsonl", "final", "checkpoints", "data_summary.txt")


@dataclass
class RunResult:
    output_dir: Path
    final_dir: Path
    train_metrics: dict[str, Any] = field(default_factory=dict)  # the last logged training line
    eval_metrics: dict[str, Any] = field(default_factory=dict)   # the final evaluation (empty without eval data)
    data_summary: str = ""
    steps: int = 0
    interrupted: bool = False  # stopped by SIGTERM/SIGINT: checkpointed, but final_dir was not written


def train(config: TrainConfig | dict | str | Path) -> RunResult:
    """Preference fine-tuning (DPO and its family) as configured; see TrainConfig for every key."""
    return run(_as_config(config), task="dpo")


def sft(config: TrainConfig | dict | str | Path) -> RunResult:
    """Supervised fine-tuning with prompt tokens masked out of the loss (prompt/completion data, or the
    chosen side of preference data: the DPO paper's "Preferred-FT")."""
    return run(_as_config(config), task="sft")


def _as_config(config: TrainConfig | dict | str | Path) -> TrainConfig:
    if isinstance(config, TrainConfig):
        return config
    if isinstance(config, dict):
        check_keys(config, "config")
        return TrainConfig(**config)
    return TrainConfig.from_yaml(config)


# ----------------------------------------------------------------------------- run folder

def prepare_output_dir(cfg: TrainConfig) -> Path:
    """Refuse a non-empty folder unless resuming or --overwrite; never touch files we did not write.

    Only checks: the folder is created once the data has passed validation, so bad input leaves nothing behind.
    """
    if not cfg.output_dir:
        raise PreftuneError("no output_dir given; pass --output-dir PATH for the run's files.")
    out = Path(cfg.output_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise PreftuneError(f"output_dir {out} is a file; pass a folder path.")
    if out.is_dir() and any(out.iterdir()) and not (cfg.resume or cfg.overwrite):
        raise PreftuneError(f"output_dir {out} is not empty; pass --resume to continue that run, "
                            "--overwrite to replace its run files, or another --output-dir.")
    return out


def _clear_run_files(out: Path) -> None:
    for name in RUN_FILES:  # only what a run writes: a user's other files in the folder stay
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


# ----------------------------------------------------------------------------- metrics

class Window:
    """Sums over the steps since the last log line; `mean()` turns them into the logged metrics."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.pairs = self.tokens = self.chosen_tokens = 0
        self.steps = 0
        self.grad_norm = 0.0
        self.t0 = time.perf_counter()

    def add_pairs(self, loss_sum: float, out, chosen_rewards=None, rejected_rewards=None, ref=None) -> None:
        s = self.sums
        n = len(out.chosen_logps)
        self.pairs += n
        self.chosen_tokens += float(out.chosen_lengths.sum())
        s["loss"] = s.get("loss", 0.0) + loss_sum
        s["logps/chosen"] = s.get("logps/chosen", 0.0) + float(out.chosen_logps.detach().sum())
        if out.rejected_logps is None:
            return
        s["logps/rejected"] = s.get("logps/rejected", 0.0) + float(out.rejected_logps.detach().sum())
        s["rewards/chosen"] = s.get("rewards/chosen", 0.0) + float(chosen_rewards.sum())
        s["rewards/rejected"] = s.get("rewards/rejected", 0.0) + float(rejected_rewards.sum())
        s["rewards/accuracies"] = s.get("rewards/accuracies", 0.0) + float((chosen_rewards > rejected_rewards).sum())
        if ref is not None:
            s["kl_sum"] = s.get("kl_sum", 0.0) + float((out.chosen_logps.detach() - ref.chosen_logps).sum())

    def sync(self, accelerator) -> None:
        """Sum the window over all processes, so logged figures cover the whole global batch."""
        if accelerator.num_processes == 1:
            return
        keys = sorted(self.sums)
        t = torch.tensor([self.sums[k] for k in keys] + [self.pairs, self.tokens, self.chosen_tokens],
                         dtype=torch.float64, device=accelerator.device)
        t = accelerator.reduce(t, reduction="sum").tolist()
        self.sums = dict(zip(keys, t[:len(keys)]))
        self.pairs, self.tokens, self.chosen_tokens = int(t[-3]), int(t[-2]), t[-1]

    def mean(self, task: str) -> dict[str, float]:
        s, n = self.sums, max(self.pairs, 1)
        m: dict[str, float] = {}
        if task == "sft":
            m["loss"] = s.get("loss", 0.0) / max(self.chosen_tokens, 1)  # token-level NLL, as trained
            m["logps/chosen"] = s.get("logps/chosen", 0.0) / n
        else:
            m["loss"] = s.get("loss", 0.0) / n
            for k in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen", "logps/rejected"):
                m[k] = s.get(k, 0.0) / n
            m["rewards/margins"] = m["rewards/chosen"] - m["rewards/rejected"]
            if "kl_sum" in s:
                m["kl"] = s["kl_sum"] / max(self.chosen_tokens, 1)
        return m

    def rates(self) -> dict[str, float]:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        return {"pairs_per_s": self.pairs / dt, "tokens_per_s": self.tokens / dt}


# ----------------------------------------------------------------------------- the run

class _StopRequest:
    """SIGTERM/SIGINT set a flag; the loop checkpoints at the next step boundary and exits cleanly."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopRequest:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.signal is not None:  # a second Ctrl-C means now
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _accelerator(mixed_precision: str):
    """A fresh Accelerator per run. accelerate keeps one global state per process; several runs from one
    Python process (SFT then DPO, or tests) may ask for different precisions, which is only safe to reset
    when this process is the whole job."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState, PartialState

    if AcceleratorState._shared_state and PartialState().num_processes == 1:
        AcceleratorState._reset_state()
        GradientState._reset_state()
    return Accelerator(mixed_precision=mixed_precision)


def lr_schedule(optimizer: torch.optim.Optimizer, kind: str, warmup: int, total: int):
    """Linear warmup to the peak, then cosine or linear decay to 0, or constant.

    (transformers' get_scheduler does the same but importing it costs seconds at start-up.)
    """

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run(cfg: TrainConfig, task: str = "dpo") -> RunResult:
    import transformers
    from tqdm.auto import tqdm

    transformers.utils.logging.set_verbosity_error()
    loss_cfg = cfg.loss_config()
    needs_reference = task == "dpo" and loss_cfg.needs_reference
    out_dir = prepare_output_dir(cfg)
    checkpoint = find_checkpoint(out_dir, cfg.resume)
    model_path = resolve_model_path(cfg.model, cfg.allow_pickle)
    accelerator = _accelerator(cfg.mixed_precision)
    say = accelerator.print
    threads = cpu_threads() if accelerator.device.type == "cpu" else None
    seed_everything(cfg.seed)

    # --- data: validated and tokenized before the (expensive) model load
    tokenizer = load_tokenizer(model_path, trust_remote_code=cfg.trust_remote_code)
    train_split, eval_split = load_splits(cfg, tokenizer, task)
    say(train_split.summary)

    # --- model
    model = load_model(model_path, dtype=cfg.dtype, attn_implementation=cfg.attn_implementation,
                       trust_remote_code=cfg.trust_remote_code, allow_pickle=cfg.allow_pickle)
    if cfg.disable_dropout:
        disable_dropout(model)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.to(accelerator.device)
    plan = plan_forward(cfg, model, accelerator.device)
    say(plan.description)
    fwd = plan.reference_kwargs()

    # --- run folder: written only now that data, tokenizer and model have all loaded
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        if checkpoint is None and cfg.overwrite:
            _clear_run_files(out_dir)
        (out_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        (out_dir / "data_summary.txt").write_text(train_split.summary + "\n")
    accelerator.wait_for_everyone()
    metrics = MetricsWriter(out_dir / "metrics.jsonl")

    # --- reference (decided before LoRA wraps the model: precompute and copy both use the bare model)
    strategy = cfg.reference
    if not needs_reference:
        strategy = "none"
    elif strategy == "auto":
        strategy = "precomputed"  # exact with dropout off, and frees the reference for the whole run
    reference: refs.Reference | None = None
    eval_reference: refs.Reference | None = None
    reference_cache: Path | None = None
    if strategy in ("precomputed", "copy"):
        ref_model = model
        if cfg.reference_model:
            ref_model = load_model(resolve_model_path(cfg.reference_model, cfg.allow_pickle), dtype=cfg.dtype,
                                   attn_implementation=cfg.attn_implementation,
                                   trust_remote_code=cfg.trust_remote_code,
                                   allow_pickle=cfg.allow_pickle).to(accelerator.device)
            disable_dropout(ref_model)
        if strategy == "precomputed":
            ident = refs.model_identity(cfg.reference_model or model_path)
            extra = {"dtype": cfg.dtype, "mixed_precision": cfg.mixed_precision}
            bs = cfg.eval_batch_size or 2 * cfg.batch_size
            caches = []
            for name, split in (("train", train_split), ("eval", eval_split)):
                if split is None:
                    caches.append(None)
                    continue
                key = refs.cache_key(ident, split.pairs, extra)
                cache_file = out_dir / "reference_logps" / f"{name}-{key}.safetensors"
                say(f"reference log-probs for {len(split.pairs):,} {name} pairs → {cache_file.relative_to(out_dir)}")
                caches.append(refs.precompute(ref_model, split.pairs, cache_file=cache_file,
                                              pad_id=tokenizer.pad_token_id, batch_size=bs,
                                              autocast=accelerator.autocast, progress=cfg.progress,
                                              save=accelerator.is_main_process, **fwd))
                if name == "train":
                    reference_cache = cache_file
            reference, eval_reference = caches
            if ref_model is not model:
                del ref_model
        else:
            reference = eval_reference = refs.FrozenModel.copy_of(ref_model, **fwd) if ref_model is model \
                else refs.FrozenModel(ref_model, **fwd)
    if cfg.lora:
        model = add_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                         target_modules=cfg.lora_target_modules)
        if cfg.gradient_checkpointing:
            model.enable_input_require_grads()
    if strategy == "lora_disabled":
        reference = eval_reference = refs.DisabledAdapters(model, **fwd)

    # --- optimizer and schedule
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay, **plan.optimizer_kwargs)
    n_proc, rank = accelerator.num_processes, accelerator.process_index
    batching = dict(batch_size=cfg.batch_size, accumulation=cfg.gradient_accumulation_steps, seed=cfg.seed,
                    group_by_length=cfg.group_by_length, num_processes=n_proc, process_index=rank)
    steps_per_epoch = len(micro_batches(train_split.pairs, epoch=0, **batching))
    total_steps = cfg.max_steps or max(1, math.ceil(steps_per_epoch * cfg.num_epochs))
    warmup = cfg.warmup_steps or int(round(cfg.warmup_ratio * total_steps))
    scheduler = lr_schedule(optimizer, cfg.lr_scheduler, warmup, total_steps)
    policy, optimizer = accelerator.prepare(LogpsModel(model, **plan.policy_kwargs()), optimizer)
    reward_shift = RewardShift()

    start_step = 0
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model=model, optimizer=optimizer,
                                scheduler=scheduler)
        start_step = state["step"]
        reward_shift.load_state_dict(state["reward_shift"])
        if accelerator.is_main_process:
            if (checkpoint / "metrics.jsonl").is_file():
                shutil.copy2(checkpoint / "metrics.jsonl", metrics.path)
            metrics.truncate_after(start_step)
        say(f"resumed from {checkpoint} at step {start_step}")

    def evaluate(step: int) -> dict[str, Any]:
        if eval_split is None:
            return {}
        policy.eval()
        win = Window()
        bs = cfg.eval_batch_size or 2 * cfg.batch_size
        pairs = eval_split.pairs
        order = sorted(range(len(pairs)), key=lambda i: -pairs[i].padded_length)[rank::n_proc]
        with torch.no_grad():
            for s in range(0, len(order), bs):
                idx = order[s:s + bs]
                batch = collate([pairs[i] for i in idx], idx, tokenizer.pad_token_id).to(accelerator.device)
                with accelerator.autocast():
                    pol = policy(batch)
                step_loss(pol, batch, win, eval_reference, update_shift=False)
        policy.train()
        win.sync(accelerator)
        row = {**win.mean(task)}
        if accelerator.is_main_process:
            metrics.write(step, "eval", row)
        return row

    def step_loss(pol, batch, win: Window, ref_source, update_shift: bool) -> torch.Tensor:
        """Sum of per-pair losses of one micro-batch (SFT: sum of token NLLs), logged into `win`."""
        win.tokens += batch.num_tokens
        if task == "sft":
            total = nll_loss(pol.chosen_logps, pol.chosen_lengths) * pol.chosen_lengths.sum()
            win.add_pairs(float(total.detach()), pol)
            return total
        ref = ref_source.logps(batch) if ref_source is not None else None
        res = preference_loss(pol.chosen_logps, pol.rejected_logps,
                              None if ref is None else ref.chosen_logps, None if ref is None else ref.rejected_logps,
                              pol.chosen_lengths, pol.rejected_lengths, loss_cfg, reward_shift=reward_shift.value)
        if update_shift and "bco_pair" in loss_cfg.loss_types:
            reward_shift.update(accelerator.gather(res.chosen_rewards), accelerator.gather(res.rejected_rewards))
        total = res.losses.sum()
        win.add_pairs(float(total.detach()), pol, res.chosen_rewards, res.rejected_rewards, ref)
        return total

    # --- the loop
    policy.train()
    pairs = train_split.pairs
    window = Window()
    last_train: dict[str, Any] = {}
    last_eval: dict[str, Any] = {}
    bar = tqdm(total=total_steps, initial=start_step, disable=not (cfg.progress and accelerator.is_main_process),
               desc=task, dynamic_ncols=True)
    epoch_cache: dict[int, list] = {}
    skipped = 0
    with _StopRequest() as stop:
        for step in range(start_step, total_steps):
            epoch, pos = divmod(step, steps_per_epoch)
            if epoch not in epoch_cache:
                epoch_cache = {epoch: micro_batches(pairs, epoch=epoch, **batching)}
            micro = epoch_cache[epoch][pos]
            # Normalise by the whole global batch (all micro-batches, all processes): accumulation then
            # gives the same gradient as one big batch, whatever the micro-batch sizes.
            denominator = sum(len(m) for m in micro) if task == "dpo" else \
                sum(len(pairs[i].chosen_ids) for m in micro for i in m)
            denominator = float(accelerator.reduce(torch.tensor(float(denominator), device=accelerator.device),
                                                   reduction="sum")) / n_proc
            bad: str | None = None
            for k, idx in enumerate(micro):
                batch = collate([pairs[i] for i in idx], idx, tokenizer.pad_token_id).to(accelerator.device)
                sync = accelerator.no_sync(policy) if k < len(micro) - 1 and n_proc > 1 else contextlib.nullcontext()
                with sync:
                    with accelerator.autocast():
                        pol = policy(batch)
                    loss = step_loss(pol, batch, window, reference, update_shift=True) / denominator
                    if not torch.isfinite(loss):
                        bad = f"the loss became {float(loss.detach())} at step {step + 1} on examples " \
                              f"{[pairs[i].index for i in idx]} (positions in the data file)"
                        break
                    accelerator.backward(loss)
            grad_norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else 1e12)
            if bad is None and not torch.isfinite(torch.as_tensor(grad_norm)):
                bad = f"the gradient became non-finite at step {step + 1} on examples " \
                      f"{[pairs[i].index for m in micro for i in m]}"
            if bad is not None:
                if cfg.on_nonfinite == "stop":
                    last = "; the last checkpoint is intact" if cfg.save_steps else ""
                    raise PreftuneError(f"{bad}{last}; lower the learning rate, check those examples, or pass "
                                        "--on-nonfinite skip to skip such steps.")
                # Skip: drop this step's gradients, keep the schedule and data position moving.
                optimizer.zero_grad(set_to_none=True)
                skipped += 1
                grad_norm = torch.tensor(0.0)
            window.grad_norm += float(grad_norm)
            window.steps += 1
            lr = scheduler.get_last_lr()[0]
            if bad is None:
                optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            bar.update(1)
            if threads is not None:
                threads.update()

            if done % cfg.logging_steps == 0 or done == total_steps:
                window.sync(accelerator)
                row = {**window.mean(task), "grad_norm": window.grad_norm / max(window.steps, 1), "lr": lr,
                       **window.rates(), "epoch": round(step / steps_per_epoch, 4)}
                if skipped:
                    row["skipped_steps"] = skipped
                if accelerator.is_main_process:
                    last_train = metrics.write(done, "train", row)
                bar.set_postfix({k: f"{row[k]:.4g}" for k in ("loss", "rewards/accuracies") if k in row})
                window = Window()
            if cfg.eval_steps and done % cfg.eval_steps == 0 and done < total_steps:
                last_eval = evaluate(done)
            if (cfg.save_steps and done % cfg.save_steps == 0) or stop.signal is not None:
                if accelerator.is_main_process:
                    save_checkpoint(out_dir, done, model=model, optimizer=optimizer,
                                    scheduler=scheduler, trainer_state={"reward_shift": reward_shift.state_dict()},
                                    reference_cache=reference_cache, keep=cfg.save_total_limit,
                                    copies=(metrics.path, out_dir / "config.yaml"))
                accelerator.wait_for_everyone()
            if stop.signal is not None:
                bar.close()
                say(f"stopped by signal {stop.signal} after step {done}; checkpoint saved; continue with --resume")
                return RunResult(out_dir, out_dir / "final", last_train, last_eval, train_split.summary, done,
                                 interrupted=True)
    bar.close()

    last_eval = evaluate(total_steps) or last_eval
    final_dir = out_dir / "final"
    if accelerator.is_main_process:
        final_dir = save_final(out_dir, model, tokenizer, merge_lora=cfg.merge_lora)
    accelerator.wait_for_everyone()
    if last_eval:
        say("eval: " + ", ".join(f"{k} {v:.4f}" for k, v in last_eval.items() if isinstance(v, float)))
    say(f"saved {final_dir}")
    return RunResult(out_dir, final_dir, last_train, last_eval, train_split.summary, total_steps)

