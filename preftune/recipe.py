"""The training recipe, shared by DPO-family runs (`train`) and supervised fine-tuning (`sft`).

Read top to bottom, a run is: setup (config → run folder checks → data → model → run folder → reference →
optimizer and schedule → resume) → the step loop (micro-batches, loss, backward, clip, step, log, evaluate,
checkpoint) → save (final/) → the end. Each concern lives in one room and this file only calls it:
what the task's loss, normaliser and metrics are (objectives.py), where reference log-probs come from
(modeling/reference.py), every path the run writes (outputs/run_dir.py), the batch order
(data/sampler.py), the forward paths (logprobs.py). Events go to callbacks (callbacks.py): the progress
bar, the console, benchmarks, trackers and reports listen there.

Assumptions: a causal LM from transformers; one process, or several launched by `accelerate launch` /
torchrun, each taking its share of every global batch; dropout off unless asked for.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from preftune.callbacks import Callback, CallbackList, ConsoleEval, ProgressBar, TrainState
from preftune.config import TrainConfig, check_keys
from preftune.data.collate import collate
from preftune.data.sampler import micro_batches, used_positions
from preftune.data.splits import keep_data_in, load_splits
from preftune.errors import PreftuneError
from preftune.logprobs import LogpsModel
from preftune.modeling.load import (
    add_lora,
    context_length,
    load_model,
    load_tokenizer,
    prepare_for_training,
    resolve_model_path,
)
from preftune.modeling.reference import build_reference
from preftune.objectives import make_objective
from preftune.optim import build_optimizer, lr_schedule
from preftune.outputs.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint, save_final
from preftune.outputs.metrics import MetricsWriter, Window
from preftune.outputs.run_dir import RunDir
from preftune.scoring import length_sorted_batches


@dataclass
class RunResult:
    output_dir: Path
    final_dir: Path
    train_metrics: dict[str, Any] = field(default_factory=dict)  # the last logged training line
    eval_metrics: dict[str, Any] = field(default_factory=dict)   # the final evaluation (empty without eval data)
    data_summary: str = ""
    steps: int = 0
    interrupted: bool = False  # stopped by SIGTERM/SIGINT: checkpointed, but final_dir was not written


def train(config: TrainConfig | dict | str | Path, callbacks: list[Callback] | None = None) -> RunResult:
    """Preference fine-tuning (DPO and its family) as configured; see TrainConfig for every key."""
    return Recipe(_as_config(config), "dpo", callbacks).run()


def sft(config: TrainConfig | dict | str | Path, callbacks: list[Callback] | None = None) -> RunResult:
    """Supervised fine-tuning with prompt tokens masked out of the loss (prompt/completion data, or the
    chosen side of preference data: the DPO paper's "Preferred-FT")."""
    return Recipe(_as_config(config), "sft", callbacks).run()


def _as_config(config: TrainConfig | dict | str | Path) -> TrainConfig:
    if isinstance(config, TrainConfig):
        return config
    if isinstance(config, dict):
        check_keys(config, "config")
        return TrainConfig(**config)
    return TrainConfig.from_yaml(config)


def default_callbacks(cfg: TrainConfig) -> list[Callback]:
    return ([ProgressBar()] if cfg.progress else []) + [ConsoleEval()]


class Recipe:
    """One run: `setup`, then `train_loop`, then `save`; `run` does all three and tells the callbacks."""

    def __init__(self, cfg: TrainConfig, task: str, callbacks: list[Callback] | None = None):
        self.cfg, self.task = cfg, task
        self.callbacks = CallbackList(default_callbacks(cfg) + list(callbacks or []))

    def run(self) -> RunResult:
        self.setup()
        self.callbacks.on_train_begin(self.state)
        with _StopRequest() as stop:
            self.train_loop(stop)
        if not self.state.interrupted:
            self.evaluate(final=True)
            self.save()
        self.callbacks.on_train_end(self.state)
        st = self.state
        return RunResult(self.run_dir.path, self.run_dir.final, st.train_metrics, st.eval_metrics,
                         st.data_summary, st.step, st.interrupted)

    # ------------------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        cfg, task = self.cfg, self.task
        self.objective = make_objective(task, cfg.loss_config())
        self.run_dir = RunDir.plan(cfg.output_dir, resume=cfg.resume, overwrite=cfg.overwrite)
        checkpoint = find_checkpoint(self.run_dir.path, cfg.resume)
        model_path = resolve_model_path(cfg.model, cfg.allow_pickle)
        self.accelerator = acc = make_accelerator(cfg.mixed_precision)
        say = acc.print
        seed_everything(cfg.seed)

        # --- data: validated and tokenized before the (expensive) model load
        self.tokenizer = load_tokenizer(model_path, trust_remote_code=cfg.trust_remote_code)
        self.cfg = cfg = fit_to_context(cfg, context_length(model_path, trust_remote_code=cfg.trust_remote_code),
                                        say)
        self.train_split, self.eval_split = load_splits(cfg, self.tokenizer, task, cache_dir=self.run_dir.data_cache)
        say(self.train_split.summary)

        # --- model
        model = load_model(model_path, dtype=cfg.dtype, attn_implementation=cfg.attn_implementation,
                           trust_remote_code=cfg.trust_remote_code, allow_pickle=cfg.allow_pickle)
        prepare_for_training(model, dropout=not cfg.disable_dropout, gradient_checkpointing=cfg.gradient_checkpointing)
        model.to(acc.device)

        # --- run folder: written only now that data, tokenizer and model have all loaded
        if acc.is_main_process:
            self.run_dir.create(clear=checkpoint is None and cfg.overwrite)
            self.run_dir.write_text(self.run_dir.config, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            self.run_dir.write_text(self.run_dir.data_summary, self.train_split.summary + "\n")
            keep_data_in(self.train_split, self.run_dir.data_cache)  # a fresh run's data was staged in TMPDIR
        acc.wait_for_everyone()
        self.metrics = MetricsWriter(self.run_dir.metrics)

        if cfg.lora:
            model = add_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                             target_modules=cfg.lora_target_modules)
            if cfg.gradient_checkpointing:
                model.enable_input_require_grads()
        # --- batching: the order is known up front, so the reference pass scores only the pairs it will use
        self.batching = dict(batch_size=cfg.batch_size, accumulation=cfg.gradient_accumulation_steps,
                             seed=cfg.seed, group_by_length=cfg.group_by_length,
                             num_processes=acc.num_processes, process_index=acc.process_index)
        self._epoch_batches: dict[int, list] = {0: micro_batches(self.train_split.pairs, epoch=0, **self.batching)}
        steps_per_epoch = len(self._epoch_batches[0])
        total_steps = cfg.max_steps or max(1, math.ceil(steps_per_epoch * cfg.num_epochs))

        def used() -> np.ndarray:
            return used_positions(self.train_split.pairs, total_steps, **{k: v for k, v in self.batching.items()
                                                                          if k != "process_index"})

        forward = dict(prefix_sharing=cfg.prefix_sharing, chunk_size=cfg.logits_chunk_size)
        self.reference = build_reference(
            cfg, model=model, model_path=model_path, needs_reference=self.objective.needs_reference,
            splits={"train": self.train_split.pairs, "eval": self.eval_split.pairs if self.eval_split else None},
            cache_path=self.run_dir.reference_cache, pad_id=self.tokenizer.pad_token_id, device=acc.device,
            forward=forward, autocast=acc.autocast, is_main_process=acc.is_main_process, say=say,
            used={"train": used})

        # --- optimizer, schedule
        self.params = [p for p in model.parameters() if p.requires_grad]
        optimizer = build_optimizer(self.params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                    eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)
        warmup = cfg.warmup_steps or int(round(cfg.warmup_ratio * total_steps))
        self.scheduler = lr_schedule(optimizer, cfg.lr_scheduler, warmup, total_steps)
        self.policy, self.optimizer = acc.prepare(LogpsModel(model, **forward), optimizer)
        self.model = model

        self.state = TrainState(
            config=cfg, task=task, output_dir=self.run_dir.path, total_steps=total_steps,
            steps_per_epoch=steps_per_epoch, is_main_process=acc.is_main_process,
            num_processes=acc.num_processes, device=acc.device, model=model, tokenizer=self.tokenizer,
            data_summary=self.train_split.summary, data_info=dict(self.train_split.info))
        if checkpoint is not None:
            self.resume(checkpoint)

    def resume(self, checkpoint: Path) -> None:
        state = load_checkpoint(checkpoint, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler)
        self.state.step = state["step"]
        self.objective.load_state_dict(state)
        if self.accelerator.is_main_process:
            if (checkpoint / "metrics.jsonl").is_file():
                shutil.copy2(checkpoint / "metrics.jsonl", self.metrics.path)
            self.metrics.truncate_after(self.state.step)
        self.accelerator.print(f"resumed from {checkpoint} at step {self.state.step}")

    # ------------------------------------------------------------------------------------------ the loop
    def train_loop(self, stop: _StopRequest) -> None:
        cfg, st = self.cfg, self.state
        self.policy.train()
        window = Window()
        self.skipped = 0
        for step in range(st.step, st.total_steps):
            epoch, position = divmod(step, st.steps_per_epoch)
            self.train_step(step, self._micro_batches(epoch)[position], window)
            st.step = done = step + 1
            self.callbacks.on_step_end(st)
            if done % cfg.logging_steps == 0 or done == st.total_steps:
                self.log_train(window, step)
                window = Window()
            if cfg.eval_steps and done % cfg.eval_steps == 0 and done < st.total_steps:
                self.evaluate()
            if (cfg.save_steps and done % cfg.save_steps == 0) or stop.signal is not None:
                self.save_checkpoint()
            if stop.signal is not None:
                st.interrupted = True
                self.accelerator.print(f"stopped by signal {stop.signal} after step {done}; checkpoint saved; "
                                       "continue with --resume")
                return

    def _micro_batches(self, epoch: int) -> list[list[list[int]]]:
        if epoch not in self._epoch_batches:  # one epoch's order at a time: a pure function of (seed, epoch)
            self._epoch_batches = {epoch: micro_batches(self.train_split.pairs, epoch=epoch, **self.batching)}
        return self._epoch_batches[epoch]

    def train_step(self, step: int, micro: list[list[int]], window: Window) -> None:
        """One optimizer step over this process's micro-batches of one global batch."""
        acc, pairs, n_proc = self.accelerator, self.train_split.pairs, self.accelerator.num_processes
        # Normalise by the whole global batch (all micro-batches, all processes): accumulation then gives the
        # same gradient as one big batch, whatever the micro-batch sizes. DDP averages gradients over
        # processes, hence the division by n_proc.
        local = self.objective.normaliser([pairs[i] for m in micro for i in m])
        denominator = self.all_reduce_sum([local])[0] / n_proc
        losses: list[torch.Tensor] = []
        for k, idx in enumerate(micro):
            batch = collate([pairs[i] for i in idx], idx, self.tokenizer.pad_token_id).to(acc.device)
            # Every process runs every backward, even after a non-finite loss: skipping one would leave the
            # others waiting in the gradient all-reduce.
            sync = acc.no_sync(self.policy) if k < len(micro) - 1 and n_proc > 1 else contextlib.nullcontext()
            with sync:
                with acc.autocast():
                    policy = self.policy(batch)
                reference = self.reference.train.logps(batch) if self.reference.train is not None else None
                total, sums = self.objective.loss(policy, reference)
                window.add({**sums, "tokens": batch.num_tokens})
                loss = total / denominator
                losses.append(loss.detach())
                acc.backward(loss)
        grad_norm = acc.clip_grad_norm_(self.params, self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else 1e12)
        bad = self._nonfinite_reason(step, micro, losses, grad_norm)
        if bad is not None:
            if self.cfg.on_nonfinite == "stop":
                last = "; the last checkpoint is intact" if self.cfg.save_steps else ""
                raise PreftuneError(f"{bad}{last}; lower the learning rate, check those examples, or pass "
                                    "--on-nonfinite skip to skip such steps.")
            # Skip: drop this step's gradients, keep the schedule and data position moving.
            self.skipped += 1
            grad_norm = torch.tensor(0.0)
        window.grad_norm += float(grad_norm)
        window.steps += 1
        window.lr = self.scheduler.get_last_lr()[0]
        if bad is None:
            self.optimizer.step()
        self.objective.end_step(self.all_reduce_sum, skipped=bad is not None)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _nonfinite_reason(self, step: int, micro: list[list[int]], losses: list[torch.Tensor],
                          grad_norm: torch.Tensor) -> str | None:
        """Why this step must not update the weights, or None; the same answer on every process."""
        pairs = self.train_split.pairs
        values = torch.stack(losses).float().cpu().tolist() if losses else []  # one device sync per step
        local = next((k for k, v in enumerate(values) if not math.isfinite(v)), None)
        if self.all_reduce_sum([float(local is not None)])[0] == 0 and torch.isfinite(torch.as_tensor(grad_norm)):
            return None
        if local is not None:
            return (f"the loss became {values[local]} at step {step + 1} on examples "
                    f"{[pairs[i].index for i in micro[local]]} (positions in the data file)")
        return (f"the gradient became non-finite at step {step + 1} on examples "
                f"{[pairs[i].index for m in micro for i in m]}")

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Sums over all processes (float64); the values themselves in a one-process run."""
        if self.accelerator.num_processes == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.accelerator.device)
        return self.accelerator.reduce(t, reduction="sum").tolist()

    # ------------------------------------------------------------------------------------------ metrics
    def log_train(self, window: Window, step: int) -> None:
        sums = window.totals(self.accelerator)
        seconds = window.seconds()
        row = {**self.objective.summarize(sums), "grad_norm": window.grad_norm / max(window.steps, 1),
               "lr": window.lr, "pairs_per_s": sums.get("pairs", 0.0) / seconds,
               "tokens_per_s": sums.get("tokens", 0.0) / seconds, "epoch": round(step / self.state.steps_per_epoch, 4)}
        if self.skipped:
            row["skipped_steps"] = self.skipped
        self.state.train_metrics = self._log("train", row)

    def evaluate(self, final: bool = False) -> dict[str, Any]:
        """Loss and metrics on the held-out split, every process scoring its share; {} without eval data."""
        if self.eval_split is None:
            return {}
        acc, cfg = self.accelerator, self.cfg
        self.policy.eval()
        window = Window()
        batches = length_sorted_batches(self.eval_split.pairs, cfg.eval_batch_size or 2 * cfg.batch_size,
                                        pad_id=self.tokenizer.pad_token_id, device=acc.device,
                                        rank=acc.process_index, world=acc.num_processes)
        with torch.no_grad():
            for _, batch in batches:
                with acc.autocast():
                    policy = self.policy(batch)
                reference = self.reference.eval.logps(batch) if self.reference.eval is not None else None
                window.add(self.objective.loss(policy, reference, training=False)[1])
        self.policy.train()
        self.state.eval_metrics = self._log("eval", self.objective.summarize(window.totals(acc)))
        return self.state.eval_metrics

    def _log(self, split: str, values: dict[str, Any]) -> dict[str, Any]:
        row = MetricsWriter.row(self.state.step, split, values)
        if self.accelerator.is_main_process:
            self.metrics.write(row)
        self.callbacks.on_log(self.state, row)
        return row

    # ------------------------------------------------------------------------------------------ saving
    def save_checkpoint(self) -> None:
        acc, st = self.accelerator, self.state
        path = None
        if acc.is_main_process:
            path = save_checkpoint(self.run_dir.path, st.step, model=self.model, optimizer=self.optimizer,
                                   scheduler=self.scheduler, trainer_state=self.objective.state_dict(),
                                   reference_cache=self.reference.cache_file, keep=self.cfg.save_total_limit,
                                   copies=(self.metrics.path, self.run_dir.config))
        acc.wait_for_everyone()
        if path is not None:
            self.callbacks.on_save(st, path)

    def save(self) -> None:
        acc, st = self.accelerator, self.state
        if acc.is_main_process:
            save_final(self.run_dir.path, self.model, self.tokenizer, merge_lora=self.cfg.merge_lora)
        acc.wait_for_everyone()
        st.final_dir = self.run_dir.final
        acc.print(f"saved {st.final_dir}")
        if acc.is_main_process:
            self.callbacks.on_save(st, st.final_dir)


# ---------------------------------------------------------------------------------------------- helpers

def fit_to_context(cfg: TrainConfig, limit: int | None, say) -> TrainConfig:
    """Cap max_length at the model's context (positions past it were never trained), saying so once."""
    if limit is None or cfg.max_length <= limit:
        return cfg
    prompt = cfg.max_prompt_length if cfg.max_prompt_length < limit else limit // 2
    note = f" and max_prompt_length {cfg.max_prompt_length} to {prompt}" if prompt != cfg.max_prompt_length else ""
    say(f"max_length {cfg.max_length} is more than the model's {limit} positions: capped it to {limit}{note}")
    return dataclasses.replace(cfg, max_length=limit, max_prompt_length=prompt)


def make_accelerator(mixed_precision: str):
    """A fresh Accelerator per run. accelerate keeps one global state per process; several runs from one
    Python process (SFT then DPO, or tests) may ask for different precisions, which is only safe to reset
    when this process is the whole job."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState, PartialState

    if AcceleratorState._shared_state and PartialState().num_processes == 1:
        AcceleratorState._reset_state()
        GradientState._reset_state()
    return Accelerator(mixed_precision=mixed_precision)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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
