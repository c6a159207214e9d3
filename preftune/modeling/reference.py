"""Reference strategies: where πref's log-probs come from.

- `copy`: a frozen second copy of the starting model (full fine-tuning); with `sync_ref_model` (TR-DPO) it moves
  toward the policy every few steps (modeling/trust_region.py), and `auto` picks it.
- `lora_disabled`: the policy itself with its LoRA adapters switched off: the base weights under the
  adapters *are* the reference, so no second copy is held in memory.
- `precomputed`: the reference's log-probs for the pairs the run's steps use (all of them for a full epoch),
  computed once in inference mode before training, stored in the run folder and reused (and extended) by
  later runs and resumes with the same model, data and tokenization; the reference model is freed
  afterwards. Exact as long as dropout is off.
- `none`: reference-free losses (SimPO).

`build_reference` is the one place that picks the strategy (what `auto` means) and builds it; the recipe
only asks the result for log-probs.

Every reference forward goes through a handle (`logprobs.LogpsModel`: a model and the ForwardPlan decided for
it once), scored in eval mode without gradients (`logprobs.inference`): the policy's own handle for
`lora_disabled` and for precomputing the starting model, a handle of its own for a copy or a separate
`reference_model` (whose plan is decided for that model). Under several processes (`Placement`): the
precomputed pass is split across them and gathered, each pair scored once; under FSDP2/ZeRO-3
(`Placement.sharded`) the handles are the ones the engine wrapped (the policy's, or a frozen copy sharded like
it), because no process holds the whole model.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from preftune.data.batching import TrainOrder
from preftune.data.tokenize import TokenizedPair
from preftune.errors import PreftuneError
from preftune.logprobs import (
    ForwardPlan,
    LogpsModel,
    SequenceLogps,
    handle_model,
    inference,
    statistics_only,
    unwrap_handle,
)
from preftune.modeling.load import load_model, resolve_model_path
from preftune.modeling.mismatched import MismatchedPairs, PrecomputedPairs, precompute_pairs, score_answers
from preftune.modeling.precomputed import (  # noqa: F401  (re-exported: the reference's public names)
    CACHE_FORMAT,
    REFERENCE_STATISTICS,
    Placement,
    Precomputed,
    Reference,
    cache_key,
    cache_problem,
    cache_settings,
    model_identity,
    precompute,
    without_adapters,
)
from preftune.modeling.trust_region import ReferenceSync


class FrozenModel(Reference):
    """A frozen model's handle (a LogpsModel, or the one the engine sharded like the policy); a PeftModel inside
    (a copy of the policy taken after LoRA was added) runs with its adapters off, so the reference is the base
    weights whatever the adapters hold."""

    def __init__(self, handle: torch.nn.Module):
        self.handle = handle.requires_grad_(False)

    def logps(self, batch) -> SequenceLogps:
        with inference(self.handle), without_adapters(handle_model(self.handle)), \
                statistics_only(self.handle, REFERENCE_STATISTICS):
            return self.handle(batch)


class DisabledAdapters(Reference):
    """The policy's own handle with its LoRA adapters off, scored in eval mode (a non-zero lora_dropout, or
    dropout kept on with `disable_dropout: false`, cannot make it noisy) and put back in its training mode."""

    def __init__(self, handle: torch.nn.Module):
        self.handle = handle
        self.model = handle_model(handle)  # the PeftModel

    def logps(self, batch) -> SequenceLogps:
        with inference(self.handle), self.model.disable_adapter(), statistics_only(self.handle, REFERENCE_STATISTICS):
            return self.handle(batch)


@dataclass(frozen=True)
class ReferenceSettings:
    """What building the reference reads of a run's settings (the TrainConfig keys of the same names), and nothing
    else of the run."""

    reference: str  # auto, copy, lora_disabled, precomputed or none
    reference_model: str | None  # a different model as the reference (None: the starting model)
    # loading a separate reference model, and the precision a precomputed cache is keyed by
    dtype: str
    mixed_precision: str
    attn_implementation: str | None
    trust_remote_code: bool
    allow_pickle: bool
    # scoring passes
    batch_size: int
    eval_batch_size: int  # 0: 2 × batch_size
    max_length: int  # KTO's mismatched pairs are cut to it
    progress: bool
    # TR-DPO: the copy moves toward the policy
    sync_ref_model: bool
    ref_model_sync_steps: int
    ref_model_mixup_alpha: float

    @classmethod
    def of(cls, cfg: Any) -> ReferenceSettings:
        """The reference settings of a TrainConfig (or of anything with these attributes)."""
        return cls(**{f.name: getattr(cfg, f.name) for f in fields(cls)})

    @property
    def scoring_batch_size(self) -> int:
        return self.eval_batch_size or 2 * self.batch_size

    def cache_settings(self, plan: ForwardPlan) -> dict[str, Any]:
        """What keys a precomputed cache besides the model and the pairs (precomputed.cache_settings)."""
        return cache_settings(plan, dtype=self.dtype, mixed_precision=self.mixed_precision,
                              trust_remote_code=self.trust_remote_code)


@dataclass
class ReferenceSetup:
    """The chosen strategy and what gives reference log-probs for the train and eval splits."""

    strategy: str  # copy, lora_disabled, precomputed or none
    train: Reference | None = None
    eval: Reference | None = None
    cache_file: Path | None = None  # the train split's precomputed cache (checkpoints link it)
    sync: ReferenceSync | None = None  # TR-DPO: the copy moves toward the policy
    mismatched: MismatchedPairs | None = None  # KTO: policy and reference log-probs of mismatched pairs

    def end_step(self, step: int) -> None:
        """After optimizer step `step` (1-based), for a reference that moves (TR-DPO); nothing otherwise."""
        if self.sync is not None:
            self.sync.end_step(step)

    def checkpoint_file(self) -> Path | None:
        """What a checkpoint links beside the weights: the precomputed cache, or TR-DPO's moved reference."""
        return self.sync.checkpoint_file() if self.sync is not None else self.cache_file


def choose_strategy(requested: str, *, needs_reference: bool, moving: bool = False) -> str:
    """What `auto` means: precomputed (exact with dropout off, and no reference model stays in memory), or copy
    when the reference moves during training (`moving`: TR-DPO), which no precomputed pass can follow."""
    if not needs_reference:
        return "none"
    if requested == "auto":
        return "copy" if moving else "precomputed"
    return requested


def build_reference(settings: ReferenceSettings, *, policy: torch.nn.Module, model_path: str, needs_reference: bool,
                    splits: dict[str, Sequence[TokenizedPair] | None], cache_path: Callable[[str, str], Path],
                    pad_id: int, placement: Placement, plan_for: Callable[[torch.nn.Module], ForwardPlan],
                    autocast=None, is_main_process: bool = True, say: Callable[[str], None] = print,
                    order: TrainOrder | None = None, steps: int = 0, checkpoint: Path | None = None,
                    mismatched: bool = False) -> ReferenceSetup:
    """Build the reference `settings.reference` asks for.

    `policy` is the policy's handle as it will be trained (its model a PeftModel when LoRA is on: the base
    weights are the reference; under a sharded engine the handle the engine wrapped, so call this after the
    engine's prepare). `plan_for(model)` decides the forward plan of a separately loaded reference model.
    `splits` maps "train"/"eval" to their tokenized pairs (eval may be None); `cache_path(split, key)` names the
    precomputed cache file of a split; `placement` says how the launch split the work and on which device.
    `order` gives the run's `steps` (known up front): only the pairs they use are precomputed (all of a split
    without it). With `settings.sync_ref_model` (TR-DPO) the copy moves toward the policy
    (`end_step`), and a resumed run (`checkpoint`) starts from the reference that checkpoint saved. With
    `mismatched` (KTO) the setup also scores mismatched pairs (`ReferenceSetup.mismatched`).
    """
    moving = settings.sync_ref_model
    strategy = choose_strategy(settings.reference, needs_reference=needs_reference, moving=moving)
    if strategy == "none":
        return ReferenceSetup(strategy)
    handle = policy
    if strategy == "lora_disabled":
        ref = DisabledAdapters(policy)
        setup = ReferenceSetup(strategy, ref, ref)
    else:
        if moving and placement.sharded:
            raise PreftuneError("sync_ref_model (TR-DPO) is not supported under FSDP2 or ZeRO-3 yet (no process "
                                "holds whole models to mix); train on one process or under DDP, or drop "
                                "sync_ref_model.")
        if settings.reference_model or (placement.sharded and strategy == "copy"):
            # Under sharding no process holds the whole policy to copy, so the copy comes from disk.
            handle = _load_reference(settings, settings.reference_model or model_path, plan_for, placement)
        kw = dict(cache_path=cache_path, is_main_process=is_main_process, say=say)
        setup = (_copy(settings, policy, handle, checkpoint, **kw) if strategy == "copy" else
                 _precomputed(settings, handle, model_path, splits, order.used(steps) if order else None, pad_id=pad_id,
                              autocast=autocast, placement=placement, **kw))
    if mismatched:
        assert order is not None
        setup.mismatched = _mismatched(settings, setup, policy, handle, splits, order, steps, model_path,
                                       cache_path=cache_path, pad_id=pad_id, autocast=autocast, placement=placement,
                                       say=say, is_main_process=is_main_process)
    return setup


def _copy(settings: ReferenceSettings, policy: torch.nn.Module, handle: torch.nn.Module, checkpoint: Path | None, *,
          cache_path: Callable[[str, str], Path], is_main_process: bool, say: Callable[[str], None]) -> ReferenceSetup:
    """A frozen copy of the starting model (or the loaded reference_model), moving under TR-DPO."""
    if handle is policy:
        handle = LogpsModel(copy.deepcopy(handle_model(policy)), _plan_of(policy))
    ref = FrozenModel(handle)
    setup = ReferenceSetup("copy", ref, ref)
    if settings.sync_ref_model:
        say(f"reference: a copy of the {'reference_model' if settings.reference_model else 'starting model'}, "
            f"moved toward the policy every {settings.ref_model_sync_steps} steps by α = "
            f"{settings.ref_model_mixup_alpha:g} (TR-DPO)")
        setup.sync = ReferenceSync(handle_model(handle), handle_model(policy), alpha=settings.ref_model_mixup_alpha,
                                   every=settings.ref_model_sync_steps, weights_file=cache_path("tr_dpo", "reference"),
                                   is_main_process=is_main_process)
        if checkpoint is not None:
            setup.sync.load(checkpoint)
    return setup


def _precomputed(settings: ReferenceSettings, handle: torch.nn.Module, model_path: str,
                 splits: dict[str, Sequence[TokenizedPair] | None], used: np.ndarray | None, *, pad_id: int, autocast: Any, placement: Placement,
                 cache_path: Callable[[str, str], Path], is_main_process: bool,
                 say: Callable[[str], None]) -> ReferenceSetup:
    """Each split's reference log-probs, scored once (of the train pairs, only those at `used` positions)."""
    ident = model_identity(settings.reference_model or model_path)
    extra = settings.cache_settings(_plan_of(handle))
    setup = ReferenceSetup("precomputed")
    for name, pairs in splits.items():
        if pairs is None:
            continue
        cache_file = cache_path(name, cache_key(ident, pairs, extra))
        positions = used if name == "train" else None
        count = f"{len(pairs):,}" if positions is None else f"{len(positions):,} of {len(pairs):,}"
        noun = "pairs" if pairs[0].rejected_ids is not None else "examples"
        say(f"reference log-probs for {count} {name} {noun} → {cache_file.parent.name}/{cache_file.name}")
        ref = precompute(handle, pairs, cache_file=cache_file, pad_id=pad_id,
                         batch_size=settings.scoring_batch_size, autocast=autocast,
                         progress=settings.progress, save=is_main_process, say=say, placement=placement,
                         positions=positions)
        setattr(setup, name, ref)
        if name == "train":
            setup.cache_file = cache_file
    return setup


def _mismatched(settings: ReferenceSettings, setup: ReferenceSetup, policy: torch.nn.Module, handle: torch.nn.Module,
                splits: dict[str, Sequence[TokenizedPair] | None], order: TrainOrder, steps: int, model_path: str, *,
                cache_path: Callable[[str, str], Path], pad_id: int, autocast: Any, placement: Placement,
                say: Callable[[str], None], is_main_process: bool) -> MismatchedPairs:
    """KTO's mismatched pairs scored under the policy and the reference: a precomputed reference scores every
    pair the run's steps (and the eval split) will use now, a live one when asked."""
    score_kw = dict(pad_id=pad_id, batch_size=settings.scoring_batch_size, autocast=autocast)
    tables: dict[str, PrecomputedPairs] = {}
    if setup.strategy == "precomputed":
        ident, extra = model_identity(settings.reference_model or model_path), settings.cache_settings(_plan_of(handle))
        for name, pairs in splits.items():
            if pairs is None:
                continue
            which = range(steps) if name == "train" else [None]
            positions = np.concatenate([MismatchedPairs.positions_of(pairs, order, name, s) for s in which])
            key = cache_key(ident, pairs, {**extra, "max_length": settings.max_length,
                                           "order": order.settings() if name == "train" else None})
            cache_file = cache_path(f"{name}_mismatched", key)
            say(f"reference log-probs of {len(np.unique(positions, axis=0)):,} mismatched {name} pairs (KTO's "
                f"reference point) → {cache_file.parent.name}/{cache_file.name}")
            tables[name] = precompute_pairs(handle, pairs, positions, cache_file=cache_file,
                                            max_length=settings.max_length,
                                            save=is_main_process, placement=placement, say=say, **score_kw)

    def reference(split: str, positions: np.ndarray, examples: list[TokenizedPair]) -> torch.Tensor:
        if split in tables:
            return tables[split](positions)
        live = setup.train if split == "train" else setup.eval
        return score_answers(live.handle, examples, reference=True, placement=placement, **score_kw)  # type: ignore[union-attr]

    def scored(examples: list[TokenizedPair]) -> torch.Tensor:
        return score_answers(policy, examples, reference=False, placement=placement, **score_kw)

    return MismatchedPairs(splits, order, max_length=settings.max_length, policy=scored, reference=reference)


def _plan_of(handle: torch.nn.Module) -> ForwardPlan:
    return unwrap_handle(handle).plan


def _load_reference(settings: ReferenceSettings, path: str, plan_for: Callable[[torch.nn.Module], ForwardPlan],
                    placement: Placement) -> torch.nn.Module:
    """A reference model from disk as a handle: its own forward plan, placed like the policy."""
    source = load_model(resolve_model_path(path, settings.allow_pickle), dtype=settings.dtype,
                        attn_implementation=settings.attn_implementation,
                        trust_remote_code=settings.trust_remote_code, allow_pickle=settings.allow_pickle)
    if not placement.sharded:
        source = source.to(placement.device)
    handle = LogpsModel(source, plan_for(source))
    if not placement.sharded:
        return handle
    if placement.wrap_frozen is None:
        raise ValueError("a sharded Placement needs wrap_frozen")
    return placement.wrap_frozen(handle)
