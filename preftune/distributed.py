"""The launch's engine: one process, DDP, FSDP2 or DeepSpeed ZeRO, as `accelerate launch` / torchrun set it up.

preftune never picks the engine itself: the accelerate config file (`accelerate launch --config_file F`, see
configs/accelerate/) or torchrun's environment does, and `Engine.create` reads what accelerate made of it. The
recipe then asks the engine, never accelerate, for what differs between engines:

    prepare        wrap the policy (LogpsModel) and optimizer: DDP, FSDP2 (accelerate's fully_shard per
                   decoder layer) or a DeepSpeed engine; one process: nothing to wrap
    accumulating   the gradient-sync context of one micro-batch (DDP: no_sync until the last; FSDP2:
                   reduce-scatter every micro-batch so gradients stay sharded; DeepSpeed: the step boundary)
    backward, clip_grad_norm, step, autocast
    reduce_sum     floats summed over processes (float64); sum_over_processes: a tensor (the metrics' totals)
    device, num_processes, process_index, is_main_process, print, barrier, main_first, local_main_first
    full_state_dict the consolidated weights for final/ (a collective under FSDP2/ZeRO-3)

`Engine.create` first checks the launch's environment variables and settles the precision (launch.py).

Precision: `autocast` is torch.autocast from the run's own setting, so several runs in one Python process
(tests, SFT then DPO) can use different precisions without resetting accelerate's per-process state (which has
no public reset); a one-process run does not hand the model or optimizer to accelerate at all, so an earlier
run's precision can never leak into it. Multi-process runs have one run per process, so accelerate's state is
always theirs (FSDP2's MixedPrecisionPolicy and DeepSpeed's bf16 section come from it).

FSDP2 on CPU: accelerate routes an FSDP request on CPU to DDP (DistributedType.MULTI_CPU); torch's FSDP2 does
run on CPU with gloo, so there the engine switches accelerate's state to FSDP and its plugin, which is what lets
the CPU tests exercise the sharded paths (tests/test_distributed.py checks the wrapper type).
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from preftune.errors import PreftuneError
from preftune.launch import check_environment, resolve_precision
from preftune.logprobs import causal_lm

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _no_accelerator_device() -> bool:
    acc = getattr(torch, "accelerator", None)
    return not (acc.is_available() if acc is not None else torch.cuda.is_available())


def _make_accelerator(mixed_precision: str):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, is_initialized

    # On a machine without GPUs, accelerate only forms a process group when told it runs on CPU; without it,
    # each process of `torchrun --nproc_per_node 2` would silently train alone.
    cpu = _world_size() > 1 and _no_accelerator_device()
    if not is_initialized() or AcceleratorState().mixed_precision == mixed_precision:
        return Accelerator(mixed_precision=mixed_precision, cpu=cpu)
    state = AcceleratorState()
    if state.num_processes == 1:
        # An earlier run of this process set another precision, which stays in accelerate's state; a
        # one-process run takes nothing precision-related from accelerate (see the module docstring).
        return Accelerator(cpu=cpu)
    raise PreftuneError(f"this process already ran with mixed precision {state.mixed_precision} under "
                        f"{state.num_processes} processes; accelerate fixes that once per process, so start "
                        f"the {mixed_precision} run as its own launch.")


@dataclass
class Engine:
    """What the launch runs on; see the module docstring."""

    accelerator: Any
    kind: str  # single, ddp, fsdp2 or deepspeed
    mixed_precision: str
    notes: list[str] = field(default_factory=list)  # one-line facts printed once by the recipe
    scaler: Any = None  # fp16 loss scaling of a one-process run (accelerate's does it under several)

    def __post_init__(self) -> None:
        if self.kind == "single" and self.mixed_precision == "fp16":
            self.scaler = torch.amp.GradScaler(self.device.type)

    # ------------------------------------------------------------------------------------------ creation
    @classmethod
    def create(cls, mixed_precision: str, say: Callable[[str], None] = print) -> Engine:
        """The engine of this launch, with the run's `mixed_precision` or the one the accelerate config asks for
        (launch.resolve_precision; `say` tells which)."""
        from accelerate.utils import DistributedType

        check_environment()  # before accelerate reads the variables (a traceback there, or a wait that never ends)
        mixed_precision = resolve_precision(mixed_precision, say)
        acc = _make_accelerator(mixed_precision)
        kind = {DistributedType.NO: "single", DistributedType.FSDP: "fsdp2",
                DistributedType.DEEPSPEED: "deepspeed"}.get(acc.distributed_type, "ddp")
        if acc.num_processes == 1 and kind == "ddp":
            kind = "single"
        engine = cls(acc, kind, mixed_precision)
        if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and kind == "ddp" and \
                acc.device.type == "cpu":
            engine._fsdp_on_cpu()
        if engine.kind == "fsdp2" and acc.state.fsdp_plugin.fsdp_version != 2:
            raise PreftuneError("preftune supports FSDP version 2 only; set `fsdp_version: 2` in the accelerate "
                                "config (configs/accelerate/fsdp2_8gpu.yaml is a ready-made one).")
        return engine

    def _fsdp_on_cpu(self) -> None:
        """accelerate turns FSDP on CPU into DDP; torch's FSDP2 runs on CPU with gloo, so switch its state back."""
        from accelerate import FullyShardedDataParallelPlugin, PartialState
        from accelerate.utils import DistributedType

        plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* variables accelerate launch exported
        if self.mixed_precision != "no":
            plugin.set_mixed_precision(self.mixed_precision)
        self.accelerator.state.fsdp_plugin = plugin
        # Both states, as accelerate's own FSDP set-up does: AcceleratorState re-reads PartialState's
        # distributed_type whenever it is constructed again.
        self.accelerator.state.distributed_type = PartialState().distributed_type = DistributedType.FSDP
        self.kind = "fsdp2"
        self.notes.append("FSDP2 on CPU (gloo): accelerate's FSDP plugin, applied by preftune")

    # ------------------------------------------------------------------------------------------ facts
    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def num_processes(self) -> int:
        return self.accelerator.num_processes

    @property
    def process_index(self) -> int:
        return self.accelerator.process_index

    @property
    def is_main_process(self) -> bool:
        return self.accelerator.is_main_process

    def print(self, *args: Any) -> None:
        self.accelerator.print(*args)

    @property
    def zero_stage(self) -> int:
        if self.kind != "deepspeed":
            return 0
        return int(self.accelerator.state.deepspeed_plugin.deepspeed_config["zero_optimization"]["stage"])

    @property
    def sharded(self) -> bool:
        """Parameters are split across processes: no process holds the whole model (FSDP2, ZeRO-3)."""
        return self.kind == "fsdp2" or self.zero_stage == 3

    @property
    def activation_checkpointing(self) -> bool:
        return self.kind == "fsdp2" and bool(self.accelerator.state.fsdp_plugin.activation_checkpointing)

    def describe(self, batch_size: int, accumulation: int) -> str:
        """One line: the engine and how the global batch is made."""
        what = {"single": "one process", "ddp": f"DDP over {self.num_processes} processes",
                "fsdp2": f"FSDP2 over {self.num_processes} processes",
                "deepspeed": f"DeepSpeed ZeRO-{self.zero_stage} over {self.num_processes} processes"}[self.kind]
        extras = [self.mixed_precision + " mixed precision"] if self.mixed_precision != "no" else []
        if self.kind == "fsdp2":
            plugin = self.accelerator.state.fsdp_plugin
            extras += ["activation checkpointing"] if plugin.activation_checkpointing else []
            extras += ["CPU offload"] if _offloads(plugin) else []
        global_batch = batch_size * accumulation * self.num_processes
        return (f"engine: {what}{' (' + ', '.join(extras) + ')' if extras else ''}; global batch {global_batch} = "
                f"{batch_size} per device × {self.num_processes} processes × {accumulation} accumulation")

    def local_main_first(self, active: bool = True) -> contextlib.AbstractContextManager:
        """A block each machine's main process runs before its other processes (who then find, say, the
        tokenized data it cached); a plain block in a one-process run or when not `active`. Collective: every
        process must pass the same `active` (accelerate's barrier is global)."""
        if self.num_processes == 1 or not active:
            return contextlib.nullcontext()
        return self.accelerator.local_main_process_first()

    def main_first(self, fn: Callable[[], Any]) -> Any:
        """fn() on the main process, its result (or its refusal) given to every process: a PreftuneError there
        must stop the others too, not leave them waiting at the next barrier."""
        result, error = None, None
        if self.is_main_process:
            try:
                result = fn()
            except PreftuneError as e:
                error = str(e)
        if self.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            result, error = broadcast_object_list([result, error])
        if error is not None:
            raise PreftuneError(error)
        return result

    def launch(self, batch_size: int, accumulation: int) -> dict[str, Any]:
        """The launch shape a checkpoint records (see check_launch)."""
        return {"engine": self.kind, "num_processes": self.num_processes, "batch_size": batch_size,
                "gradient_accumulation_steps": accumulation,
                "global_batch": batch_size * accumulation * self.num_processes}

    # ------------------------------------------------------------------------------------------ preparing
    def prepare(self, policy: torch.nn.Module, optimizer: torch.optim.Optimizer, *, batch_size: int,
                accumulation: int, max_grad_norm: float) -> tuple[torch.nn.Module, Any]:
        """The policy (a LogpsModel) and optimizer wrapped for this engine."""
        if self.kind == "single":
            return policy.to(self.device), optimizer
        # The forward plan (the policy's) already counts FSDP activation checkpointing: it is decided once, before.
        _expose_model_facts(policy)
        if self.kind == "deepspeed":
            self._fill_deepspeed_config(batch_size, accumulation, max_grad_norm)
        with warnings.catch_warnings():
            # FSDP2 warns that the forward returns views (sums[:b]); the losses never modify them in place.
            warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
            return self.accelerator.prepare(policy, optimizer)

    def _fill_deepspeed_config(self, batch_size: int, accumulation: int, max_grad_norm: float) -> None:
        """preftune's batch, accumulation and clipping are the source of truth: written into the DeepSpeed
        config the way accelerate documents for a run without a dataloader."""
        ds = self.accelerator.state.deepspeed_plugin.deepspeed_config
        wanted = {"train_micro_batch_size_per_gpu": batch_size, "gradient_accumulation_steps": accumulation,
                  "train_batch_size": batch_size * accumulation * self.num_processes,
                  "gradient_clipping": max_grad_norm}
        changed = [f"{k} {ds[k]}→{v}" for k, v in wanted.items() if ds.get(k, "auto") not in ("auto", v)]
        ds.update(wanted)
        if changed:
            self.notes.append("DeepSpeed config follows preftune's flags: " + ", ".join(changed))

    def prepare_frozen(self, module: torch.nn.Module) -> torch.nn.Module:
        """A second model (the live reference: a LogpsModel around a frozen copy) placed like the policy:
        sharded the same way under FSDP2/ZeRO-3, kept in eval mode; as it is under one process or DDP
        (inference needs no gradient sync)."""
        module.eval().requires_grad_(False)
        if self.kind == "fsdp2":
            from accelerate.utils.fsdp_utils import fsdp2_prepare_model

            _expose_model_facts(module)
            module = fsdp2_prepare_model(self.accelerator, module)
        elif self.kind == "deepspeed":
            module = self._deepspeed_inference(module)
        else:
            module = module.to(self.device)
        return module.eval()

    def _deepspeed_inference(self, module: torch.nn.Module) -> torch.nn.Module:
        """ZeRO-3 partitions a frozen model like the policy; below stage 3 a plain copy per GPU (stage 0).
        The same recipe as TRL's `prepare_deepspeed` for reference models. UNTESTED (no DeepSpeed here)."""
        import copy

        import deepspeed

        config = copy.deepcopy(self.accelerator.state.deepspeed_plugin.deepspeed_config)
        if self.zero_stage != 3:
            config["zero_optimization"]["stage"] = 0
        config.pop("optimizer", None)
        config.pop("scheduler", None)
        engine, *_ = deepspeed.initialize(model=module, config=config)
        return engine

    # ------------------------------------------------------------------------------------------ a step
    def autocast(self) -> contextlib.AbstractContextManager:
        """torch.autocast for bf16/fp16 runs (DeepSpeed casts by its own config instead)."""
        if self.mixed_precision not in PRECISIONS or self.kind == "deepspeed":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=PRECISIONS[self.mixed_precision])

    @contextlib.contextmanager
    def accumulating(self, policy: torch.nn.Module, *, last: bool) -> Iterator[None]:
        """Around one micro-batch's forward and backward; `last`: the step's last micro-batch here."""
        if self.kind == "ddp" and not last:
            with self.accelerator.no_sync(policy):  # all-reduce once per step
                yield
        elif self.kind == "deepspeed":
            # accelerate's DeepSpeed backward steps the engine when sync_gradients is set (its public setter).
            self.accelerator.sync_gradients = last
            try:
                yield
            finally:
                self.accelerator.sync_gradients = True
        else:
            # FSDP2 reduce-scatters every micro-batch: skipping it would keep whole unsharded gradients
            # until the last one, the memory FSDP exists to save.
            yield

    def backward(self, loss: torch.Tensor) -> None:
        if self.kind == "single":
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        elif self.kind == "deepspeed":
            # The loss is already divided by the whole global batch's normaliser: no further 1/accumulation.
            self.accelerator.backward(loss, scale_wrt_gas=False)
        else:
            self.accelerator.backward(loss)

    def clip_grad_norm(self, params: list[torch.nn.Parameter], max_norm: float, optimizer: Any) -> torch.Tensor:
        """The global gradient norm before clipping (all processes agree on it). Under DeepSpeed the engine
        clipped and stepped inside the last backward (gradient_clipping in its config): a non-finite update
        cannot be skipped there, and this reads its norm."""
        if self.kind == "single":
            if self.scaler is not None:
                self.scaler.unscale_(optimizer)
            return torch.nn.utils.clip_grad_norm_(params, max_norm)
        norm = self.accelerator.clip_grad_norm_(params, max_norm)
        if norm is None:
            return torch.tensor(float("nan"))
        if hasattr(norm, "full_tensor"):  # a replicated DTensor under FSDP2
            norm = norm.full_tensor()
        return torch.as_tensor(norm, dtype=torch.float32).detach().cpu()

    def step(self, optimizer: Any) -> None:
        """The optimizer update (a no-op under DeepSpeed, whose engine stepped in the last backward)."""
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()

    def reduce_sum(self, values: list[float]) -> list[float]:
        """Sums over all processes (float64); the values themselves in a one-process run."""
        if self.num_processes == 1:
            return list(values)
        return self.sum_over_processes(torch.tensor(values, dtype=torch.float64, device=self.device)).tolist()

    def sum_over_processes(self, values: torch.Tensor) -> torch.Tensor:
        """The elementwise sum of `values` (on self.device) over all processes; `values` in a one-process run."""
        if self.num_processes == 1:
            return values
        return self.accelerator.reduce(values, reduction="sum")

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    # ------------------------------------------------------------------------------------------ saving
    def full_state_dict(self, policy: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The whole model's weights, keyed like the transformers (or PEFT) model inside the LogpsModel, on
        the main process ({} elsewhere); all processes must call it. FSDP2 gathers the shards; ZeRO-3 needs
        `stage3_gather_16bit_weights_on_model_save: true` (the ready-made configs set it)."""
        try:
            full = self.accelerator.get_state_dict(policy)
        except ValueError as e:  # DeepSpeed without the gather option says how to fix it
            raise PreftuneError(f"could not gather the final weights: {str(e).splitlines()[0]}") from None
        prefix = "model."
        return {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)} if self.is_main_process else {}


def check_launch(checkpoint: Path, now: dict[str, Any]) -> None:
    """Refuse to resume `checkpoint` under launch `now` (Engine.launch) when its files cannot be read there:
    a DeepSpeed checkpoint needs the same DeepSpeed launch. Any other launch shape reads a DCP checkpoint
    (resharded on load); whether it continues the same run (the same global batch) is part of the resume
    check (outputs/identity.py)."""
    state = checkpoint / "trainer_state.json"
    saved = json.loads(state.read_text()).get("launch") if state.is_file() else None
    if not saved:
        return
    if (saved["engine"] == "deepspeed") != (now["engine"] == "deepspeed") or (
            saved["engine"] == "deepspeed" and saved["num_processes"] != now["num_processes"]):
        raise PreftuneError(f"checkpoint {checkpoint.name} was written by {saved['engine']} on "
                            f"{saved['num_processes']} processes; DeepSpeed checkpoints resume only under the same "
                            "DeepSpeed launch (convert with DeepSpeed's ds_to_universal otherwise).")


def _expose_model_facts(wrapper: torch.nn.Module) -> None:
    """What accelerate reads from a transformers model, copied onto the LogpsModel around it: FSDP2's
    transformer-based wrap takes the decoder-layer classes from `_no_split_modules`, and DeepSpeed's "auto"
    bucket sizes come from `config.hidden_size`."""
    lm = causal_lm(getattr(wrapper, "model", wrapper))
    wrapper._no_split_modules = getattr(lm, "_no_split_modules", None)
    if getattr(lm, "config", None) is not None:
        wrapper.config = lm.config


def _offloads(plugin: Any) -> bool:
    from torch.distributed.fsdp import CPUOffloadPolicy

    return isinstance(getattr(plugin, "cpu_offload", None), CPUOffloadPolicy)

