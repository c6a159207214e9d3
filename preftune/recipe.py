"""The training recipe, shared by DPO-family runs (`train`) and supervised fine-tuning (`sft`).

Read top to bottom, a run is: setup (config → run folder checks → data → model → run folder → reference →
optimizer and schedule → resume) → the step loop (micro-batches, loss, backward, clip, step, log, evaluate,
checkpoint) → save (final/) → the end. The rest is called where it is owned: building the data, the model and
its optimizer (recipe_setup.py), the task's loss, normaliser and metrics (objectives.py), reference log-probs
(modeling/reference.py), every path the run writes (outputs/run_dir.py), the steps' order and each process's
share (data/batching.py), the forward paths (logprobs.py), and whatever differs between one process, DDP, FSDP2
and DeepSpeed (the Engine, distributed.py; never accelerate directly). Events go to callbacks (callbacks.py),
each phase of the run included: the progress bar, the console, bench/'s clocks, trackers and reports listen there.

Assumptions: a causal LM from transformers; one or more processes (accelerate, torchrun); dropout if asked.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from preftune.callbacks import Callback, CallbackList, ConsoleEval, ProgressBar, TrainState, checked_callbacks
from preftune.config import TrainConfig
from preftune.data.batching import Share, TrainOrder
from preftune.data.collate import collate
from preftune.data.splits import keep_data_in
from preftune.device import ForwardOptions, cpu_threads, plan_forward
from preftune.distributed import Engine, check_launch
from preftune.errors import PreftuneError
from preftune.hub import HubCallback
from preftune.logprobs import LogpsModel, inference, unwrap_handle
from preftune.modeling.load import resolve_model_path
from preftune.modeling.reference import Placement, ReferenceSettings, build_reference
from preftune.objectives import make_objective
from preftune.optim import lr_schedule, warmup_steps
from preftune.outputs.checkpoint import load_checkpoint, pick_checkpoint, save_checkpoint, save_final
from preftune.outputs.identity import check_resume, run_identity
from preftune.outputs.metrics import MetricsWriter, Window, zeroed
from preftune.outputs.model_card import ModelCardCallback
from preftune.outputs.report import ReportCallback
from preftune.outputs.run_dir import RunDir
from preftune.outputs.trackers import TrackerCallback
from preftune.recipe_setup import load_data, load_policy, trainable
from preftune.runtime import StopRequest, seed_everything
from preftune.scoring import length_sorted_batches


@dataclass
class RunResult:
    output_dir: Path
    final_dir: Path
    train_metrics: dict[str, Any] = field(default_factory=dict)  # the last logged training line
    eval_metrics: dict[str, Any] = field(default_factory=dict)   # the final evaluation (empty without eval data)
    data_summary: str = ""
    steps: int = 0
    interrupted: bool = False  # stopped by SIGTERM/SIGINT: checkpointed, or final_dir whole but not evaluated


def train(config: TrainConfig | dict | str | Path, callbacks: list[Callback] | None = None) -> RunResult:
    """Preference fine-tuning (DPO and its family) as configured; see TrainConfig for every key."""
    return Recipe(_as_config(config), "dpo", callbacks).run()


def sft(config: TrainConfig | dict | str | Path, callbacks: list[Callback] | None = None) -> RunResult:
    """Supervised fine-tuning with prompt tokens masked out of the loss (prompt/completion data, or the
    chosen side of preference data: the DPO paper's "Preferred-FT")."""
    return Recipe(_as_config(config), "sft", callbacks).run()


def _as_config(config: TrainConfig | dict | str | Path) -> TrainConfig:
    if isinstance(config, (dict, str, Path)):
        return TrainConfig.from_dict(config) if isinstance(config, dict) else TrainConfig.from_yaml(config)
    if not isinstance(config, TrainConfig):
        raise PreftuneError(f"the config must be a TrainConfig, a dict of its keys or the path of a YAML file, "
                            f"got {type(config).__name__}.")
    return config


def default_callbacks(cfg: TrainConfig) -> list[Callback]:
    """What every run reports: the progress bar, eval lines as they happen, trackers (`report_to`), the run
    report (RUN/report/), the model card (final/README.md) and the hub upload (`push_to_hub`, after the card).
    Built before anything loads, so a tracker whose package is missing stops the run at once."""
    callbacks: list[Callback] = [ProgressBar()] if cfg.progress else []
    callbacks.append(ConsoleEval())
    if cfg.report_to:
        callbacks.append(TrackerCallback(cfg.report_to))
    callbacks += [ReportCallback(), ModelCardCallback()]
    if cfg.push_to_hub:
        callbacks.append(HubCallback())
    return callbacks


class Recipe:
    """One run: `setup`, then `train_loop`, then `save`; `run` does all three and tells the callbacks."""

    def __init__(self, cfg: TrainConfig, task: str, callbacks: list[Callback] | None = None):
        self.cfg, self.task = cfg, task
        self.callbacks = CallbackList(default_callbacks(cfg) + checked_callbacks(callbacks))

    def run(self) -> RunResult:
        with StopRequest(phase="setup") as stop:  # what a signal does in each phase: runtime.py
            try:
                if self.setup() is not False:  # False: the run in output_dir is finished, nothing to resume
                    self.callbacks.on_train_begin(self.state)
                    stop.phase = None
                    with self.callbacks.phase(self.state, "steps"):
                        self.train_loop(stop)
                    if stop.signal is None:  # a signal from here on cuts the evaluation short, stops after final/
                        with self.callbacks.phase(self.state, "evaluate"):
                            self.evaluate(stop)
                        with self.callbacks.phase(self.state, "save"):
                            self.save()
                    self.state.interrupted = stop.signal is not None
                    self.callbacks.on_train_end(self.state)
                    self.engine.barrier()  # no process leaves (tearing down its process group) while another writes
            finally:  # however the run ends, the folder is free for the next one
                if getattr(self, "run_dir", None) is not None:
                    self.run_dir.release()
        st = self.state
        return RunResult(self.run_dir.path, self.run_dir.final, st.train_metrics, st.eval_metrics,
                         st.data_summary, st.step, st.interrupted)

    # ------------------------------------------------------------------------------------------ setup
    def setup(self) -> bool | None:
        """config → launch → data → model → run folder → optimizer and engine → reference → resume; False when
        the run in output_dir is finished and --resume has nothing to do."""
        import transformers

        transformers.utils.logging.set_verbosity_error()
        cfg = self.cfg
        self.objective = make_objective(self.task, cfg.loss_config(), cfg.reference)
        self.run_dir = RunDir.checked(cfg.output_dir, resume=cfg.resume, overwrite=cfg.overwrite,  # checks only
                                   cache=cfg.data_cache_dir)
        self.state = TrainState(config=cfg, task=self.task, output_dir=self.run_dir.path)
        self.model_path = resolve_model_path(cfg.model, cfg.allow_pickle)
        notes: list[str] = []
        self.engine = engine = Engine.create(cfg.mixed_precision, notes.append)  # the launch may set the precision
        if self.run_dir.finished(cfg.resume, say=engine.print):
            self.state.step = self.run_dir.recorded("finished_step") or 0
            return False
        self.cfg = cfg = dataclasses.replace(cfg, mixed_precision=engine.mixed_precision)
        launch = engine.launch(cfg.batch_size, cfg.gradient_accumulation_steps)
        # checked against its manifest (the newest intact one for --resume) by the main process
        checkpoint = engine.main_first(lambda: pick_checkpoint(self.run_dir.path, cfg.resume, engine.print))
        if checkpoint is not None:
            check_launch(checkpoint, launch)
        seed_everything(cfg.seed)
        with self.callbacks.phase(self.state, "data"):  # validated and tokenized before the (expensive) model load
            self.cfg, self.tokenizer, self.train_split, self.eval_split = load_data(
                cfg, self.objective.name, self.model_path, engine, self.run_dir.data_cache)  # unpaired data for KTO
        # what every checkpoint records, and a resume must match: before the model loads, so a refusal is quick
        self.identity = run_identity(self.cfg.to_dict(), self.task, self.model_path, self.train_split.pairs)
        if checkpoint is not None:
            check_resume(checkpoint, self.identity, force=cfg.resume_force, say=engine.print, launch=launch)
        with self.callbacks.phase(self.state, "model"):
            splits = [self.train_split.pairs, *([self.eval_split.pairs] if self.eval_split else [])]
            model, plan = load_policy(self.cfg, self.objective.name, self.model_path, self.tokenizer, splits, engine)
            self.threads = cpu_threads() if engine.device.type == "cpu" else None
        # The run folder is written only once everything loaded; the main process locks it (a refusal stops all).
        fresh = checkpoint is None and (cfg.overwrite or cfg.resume == "auto")  # auto: a requeued job's first try
        engine.main_first(lambda: self._create_run_folder(clear=fresh))
        self.metrics = MetricsWriter(self.run_dir.metrics)
        with self.callbacks.phase(self.state, "prepare"):
            model = self._setup_training(model, plan)
        plan = self.state.plan  # the one the engine's handle runs (tests/test_distributed.py checks it after wrapping)
        for line in [engine.describe(cfg.batch_size, cfg.gradient_accumulation_steps), plan.description, *notes,
                     *engine.notes, *self.objective.notes]:
            engine.print(line)
        with self.callbacks.phase(self.state, "reference"):
            self._setup_reference(model, plan, checkpoint)
        if checkpoint is not None:
            with self.callbacks.phase(self.state, "resume"):
                self.resume(checkpoint)

    def _setup_training(self, model: torch.nn.Module, plan: Any) -> torch.nn.Module:
        """LoRA, optimizer, schedule, the steps' order and the engine's wrapping; returns the (maybe LoRA) model."""
        cfg, engine = self.cfg, self.engine
        model, optimizer = trainable(cfg, model, plan)
        # The dtypes final/ is written in (FSDP2 upcasts trainable weights to fp32 under mixed precision).
        self.dtypes = {k: v.dtype for k, v in model.state_dict().items()} if engine.sharded else None
        self.order = TrainOrder(self.train_split.pairs, cfg.batch_size, cfg.gradient_accumulation_steps, cfg.seed,
                                cfg.group_by_length, rank=engine.process_index, world=engine.num_processes)
        steps_per_epoch = self.order.steps_per_epoch
        total_steps = cfg.max_steps or max(1, math.ceil(steps_per_epoch * cfg.num_epochs))
        warmup = cfg.warmup_steps or warmup_steps(cfg.warmup_ratio, total_steps)
        self.scheduler = lr_schedule(optimizer, cfg.lr_scheduler, warmup, total_steps)
        self.policy, self.optimizer = engine.prepare(
            LogpsModel(model, plan), optimizer, batch_size=cfg.batch_size,
            accumulation=cfg.gradient_accumulation_steps, max_grad_norm=cfg.max_grad_norm)
        self.params = [p for p in self.policy.parameters() if p.requires_grad]  # FSDP2 swapped in DTensors
        self.model = model
        vars(self.state).update(  # in place: callbacks may hold it since the first phase
            config=cfg, total_steps=total_steps, steps_per_epoch=steps_per_epoch, is_main_process=engine.is_main_process,
            num_processes=engine.num_processes, device=engine.device, model=model, tokenizer=self.tokenizer,
            data_summary=self.train_split.summary, data_info=dict(self.train_split.info),
            plan=unwrap_handle(self.policy).plan)
        return model

    def _setup_reference(self, model: torch.nn.Module, plan: Any, checkpoint: Path | None = None) -> None:
        """After the engine's prepare, so a sharded policy can score the precomputed pass (split by process)."""
        cfg, engine = self.cfg, self.engine
        placement = Placement(rank=engine.process_index, world=engine.num_processes, sharded=engine.sharded,
                              device=engine.device, wrap_frozen=engine.prepare_frozen)
        handle = self.policy if engine.sharded else unwrap_handle(self.policy)  # sharded: the wrapper gathers
        plan_for = functools.partial(plan_forward, device=engine.device, options=ForwardOptions.of(cfg),
                                     sharded=engine.sharded, training=False)  # a separate reference_model's plan
        with self.run_dir.saving("the reference log-probs cache", "nothing else was changed"):
            self.reference = build_reference(
                ReferenceSettings.of(cfg), policy=handle, model_path=self.model_path,
                needs_reference=self.objective.needs_reference,
                splits={"train": self.train_split.pairs, "eval": self.eval_split.pairs if self.eval_split else None},
                cache_path=self.run_dir.reference_cache, pad_id=self.tokenizer.pad_token_id, placement=placement,
                plan_for=plan_for, autocast=engine.autocast, is_main_process=engine.is_main_process,
                say=engine.print, checkpoint=checkpoint,
                # the order is known up front: only the pairs the steps use are scored (and KTO's mismatched pairs)
                order=self.order, steps=self.state.total_steps, mismatched=self.objective.needs_mismatched)
        self.objective.bind(self.reference)  # KTO's reference point and TR-DPO's moving reference use it

    def _create_run_folder(self, clear: bool) -> None:
        self.run_dir.create(clear=clear, say=self.engine.print)
        self.run_dir.write_config(self.cfg.to_dict(), self.identity, self.train_split.summary)
        keep_data_in(self.train_split, self.run_dir.data_cache)  # a fresh run's data was staged in TMPDIR

    def resume(self, checkpoint: Path) -> None:
        state = load_checkpoint(checkpoint, model=self.policy, optimizer=self.optimizer, scheduler=self.scheduler)
        self.state.step = state["step"]
        self.objective.load_state_dict(state)
        if self.engine.is_main_process:
            self.run_dir.restore_metrics(checkpoint, self.state.step)
        self.engine.print(f"resumed from {checkpoint} at step {self.state.step}")

    # ------------------------------------------------------------------------------------------ the loop
    def train_loop(self, stop: StopRequest) -> None:
        cfg, st = self.cfg, self.state
        self.policy.train()
        window = Window()
        self.skipped = 0
        for step in range(st.step, st.total_steps):
            self.train_step(step, self.step_batch(step), window)
            st.step = done = step + 1
            self.callbacks.on_step_end(st)
            if done % cfg.logging_steps == 0 or done == st.total_steps:
                self.log_train(window, step)
                window = Window()
            with window.paused():  # evaluations and checkpoints are not training time (pairs_per_s)
                if cfg.eval_steps and done % cfg.eval_steps == 0 and done < st.total_steps:
                    self.evaluate(stop)
                if (cfg.save_steps and done % cfg.save_steps == 0) or stop.signal is not None:
                    self.save_checkpoint()
            if stop.signal is not None:
                st.interrupted = True
                self.engine.print(f"stopped by signal {stop.signal} after step {done}; checkpoint saved; continue "
                                  "with --resume")
                return

    def step_batch(self, step: int) -> tuple[Any, Share]:
        """A step's pairs and this process's share of them: the data's, or for an online run new pairs sampled from
        the policy as it is now and judged (onpolicy/online.py; its prompts stand in for the data)."""
        if self.cfg.online:
            return self.train_split.step_pairs(self.model, step, self.order.share(step))
        return self.train_split.pairs, self.order.share(step)

    def train_step(self, step: int, batch: tuple[Any, Share], window: Window) -> None:
        """One optimizer step over this process's micro-batches of one global batch (`step_batch`)."""
        (pairs, share), engine, n_proc = batch, self.engine, self.engine.num_processes
        micro = share.batches
        self.objective.begin_step(step)  # KTO: its reference point, from the whole global batch
        # Normalise by the whole global batch (all micro-batches, all processes): accumulation then gives the
        # same gradient as one big batch, whatever the micro-batch sizes. DDP, FSDP2 and ZeRO average
        # gradients over processes, hence the division by n_proc.
        local = self.objective.normaliser([pairs[i] for m in micro for i in m])
        denominator = engine.reduce_sum([local])[0] / n_proc
        losses: list[torch.Tensor] = []
        runs = list(share.runs())
        for k, (idx, filler) in enumerate(runs):
            batch = collate([pairs[i] for i in idx], idx, self.tokenizer.pad_token_id).to(engine.device)
            # Every process runs every backward, even after a non-finite loss or with nothing left to learn
            # from (a filler): skipping one would leave the others waiting in a collective.
            with engine.accumulating(self.policy, last=k == len(runs) - 1):
                with engine.autocast():
                    policy = self.policy(batch)
                reference = self.reference.train.logps(batch) if self.reference.train is not None else None
                total, sums = self.objective.loss(policy, reference, training=not filler)
                window.add(zeroed({**sums, "tokens": batch.num_tokens}) if filler else
                           {**sums, "tokens": batch.num_tokens})
                if filler:
                    loss = total * 0.0
                else:
                    loss = total / denominator
                    losses.append(loss.detach())
                engine.backward(loss)
        grad_norm = engine.clip_grad_norm(self.params, self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else 1e12,
                                          self.optimizer)
        bad = self._nonfinite_reason(step, pairs, micro, losses, grad_norm)
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
            engine.step(self.optimizer)
        self.objective.end_step(engine.reduce_sum, skipped=bad is not None)  # BCO's shift; TR-DPO's reference moves
        self.scheduler.step()
        if self.threads is not None:  # fewer threads while other processes keep cores busy (device.py)
            self.threads.update()
        self.optimizer.zero_grad(set_to_none=True)

    def _nonfinite_reason(self, step: int, pairs: Any, micro: list[list[int]], losses: list[torch.Tensor],
                          grad_norm: torch.Tensor) -> str | None:
        """Why this step must not update the weights, or None; the same answer on every process."""
        values = torch.stack(losses).float().cpu().tolist() if losses else []  # one device sync per step
        local = next((k for k, v in enumerate(values) if not math.isfinite(v)), None)
        if self.engine.reduce_sum([float(local is not None)])[0] == 0 and torch.isfinite(torch.as_tensor(grad_norm)):
            return None
        if local is not None:
            return (f"the loss became {values[local]} at step {step + 1} on examples "
                    f"{[pairs[i].index for i in micro[local]]} (positions in the data file)")
        return (f"the gradient became non-finite at step {step + 1} on examples "
                f"{[pairs[i].index for m in micro for i in m]}")

    # ------------------------------------------------------------------------------------------ metrics
    def log_train(self, window: Window, step: int) -> None:
        sums = window.totals(self.engine)
        seconds = window.seconds()
        row = {**self.objective.summarize(sums), "grad_norm": window.grad_norm / max(window.steps, 1),
               "lr": window.lr, "pairs_per_s": sums.get("pairs", 0.0) / seconds,
               "tokens_per_s": sums.get("tokens", 0.0) / seconds, "epoch": round((step + 1) / self.state.steps_per_epoch, 4)}
        if self.skipped:
            row["skipped_steps"] = self.skipped
        row.update(self.train_split.metrics(self.engine.reduce_sum) if self.cfg.online else {})  # sampled, judged pairs
        self.state.train_metrics = self._log("train", row)

    def evaluate(self, stop: StopRequest) -> dict[str, Any]:
        """Loss and metrics on the held-out split, every process scoring its share; {} without eval data, or when
        a signal cut it short (one process: under several, each ends its share, as the others wait for it)."""
        if self.eval_split is None:
            return {}
        engine, cfg = self.engine, self.cfg
        window = Window()
        batches = length_sorted_batches(self.eval_split.pairs, cfg.eval_batch_size or 2 * cfg.batch_size,
                                        pad_id=self.tokenizer.pad_token_id, device=engine.device,
                                        rank=engine.process_index, world=engine.num_processes)
        with inference(self.policy):  # eval mode and no gradients; the training modes come back afterwards
            for _, filler, batch in batches:
                if stop.signal is not None and engine.num_processes == 1:
                    return {}
                with engine.autocast():
                    policy = self.policy(batch)
                reference = self.reference.eval.logps(batch) if self.reference.eval is not None else None
                sums = self.objective.loss(policy, reference, training=False)[1]
                window.add(zeroed(sums) if filler else sums)  # a filler (data/batching.py) counts nothing
        self.state.eval_metrics = self._log("eval", self.objective.summarize(window.totals(engine)))
        return self.state.eval_metrics

    def _log(self, split: str, values: dict[str, Any]) -> dict[str, Any]:
        row = MetricsWriter.row(self.state.step, split, values)
        if self.engine.is_main_process:
            with self.run_dir.saving("metrics.jsonl", "the lines before are intact", then="continue with --resume"):
                self.metrics.write(row)
        self.callbacks.on_log(self.state, row)
        return row

    # ------------------------------------------------------------------------------------------ saving
    def save_checkpoint(self) -> None:
        engine, st = self.engine, self.state
        # Every process writes its shards (checkpoint.py synchronises them); the main one the rest.
        with self.run_dir.saving(f"the checkpoint of step {st.step}", "the previous checkpoints are intact",
                                 then="continue with --resume"):
            path = self._write_checkpoint()
        engine.barrier()
        if engine.is_main_process:
            self.callbacks.on_save(st, path)

    def save(self) -> None:
        engine, st = self.engine, self.state
        # Sharded: every process takes part in gathering the weights, which only the main one receives.
        full = engine.full_state_dict(self.policy) if engine.sharded else None
        if engine.is_main_process:
            # A full disk at final/: keep the trained weights as a checkpoint instead (one process only: under
            # several, a checkpoint is a collective write the others are not waiting for).
            keep = (functools.partial(self.run_dir.keep_weights, st.step, self._write_checkpoint)
                    if engine.num_processes == 1 else "the latest checkpoint is intact")
            with self.run_dir.saving("final/", keep):
                save_final(self.run_dir.path, self.model, self.tokenizer, merge_lora=self.cfg.merge_lora,
                           state_dict=full, dtypes=self.dtypes)
        engine.barrier()
        st.final_dir = self.run_dir.final
        engine.print(f"saved {st.final_dir}")
        if engine.is_main_process:
            self.run_dir.record(finished_step=st.step)  # --resume auto of this command now has nothing to do
            self.callbacks.on_save(st, st.final_dir)

    def _write_checkpoint(self) -> Path:
        cfg = self.cfg
        state = {**self.objective.state_dict(), "identity": self.identity,
                 "launch": self.engine.launch(cfg.batch_size, cfg.gradient_accumulation_steps)}
        return save_checkpoint(self.run_dir.path, self.state.step, model=self.policy, optimizer=self.optimizer,
                               scheduler=self.scheduler, trainer_state=state, reference_cache=self.reference.checkpoint_file(),
                               keep=cfg.save_total_limit, copies=(self.metrics.path, self.run_dir.config))
