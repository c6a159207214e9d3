"""Reference strategies: where πref's log-probs come from.

- `copy`: a frozen second copy of the starting model (full fine-tuning).
- `lora_disabled`: the policy itself with its LoRA adapters switched off: the base weights under the
  adapters *are* the reference, so no second copy is held in memory.
- `precomputed`: the reference's log-probs for the pairs the run's steps use (all of them for a full epoch),
  computed once in inference mode before training, stored in the run folder and reused (and extended) by
  later runs and resumes with the same model, data and tokenization; the reference model is freed
  afterwards. Exact as long as dropout is off.
- `none`: reference-free losses (SimPO).

`build_reference` is the one place that picks the strategy (what `auto` means) and builds it; the recipe
only asks the result for log-probs.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from preftune.data.store import pairs_digest
from preftune.data.tokenize import TokenizedPair
from preftune.logprobs import SequenceLogps, forward_logps


class Reference:
    """Gives reference log-probs for a batch (always without gradients)."""

    def logps(self, batch) -> SequenceLogps:
        raise NotImplementedError


def without_adapters(model: torch.nn.Module) -> contextlib.AbstractContextManager:
    """The base model's forward: LoRA adapters switched off for a PeftModel, nothing to do otherwise."""
    return model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()


class FrozenModel(Reference):
    """A frozen model in eval mode; a PeftModel (a copy of the policy taken after LoRA was added) runs with
    its adapters off, so the reference is the base weights whatever the adapters hold."""

    def __init__(self, model: torch.nn.Module, *, prefix_sharing: bool, chunk_size: int):
        self.model = model.eval().requires_grad_(False)
        self.prefix_sharing, self.chunk_size = prefix_sharing, chunk_size

    @torch.no_grad()
    def logps(self, batch) -> SequenceLogps:
        with without_adapters(self.model):
            return forward_logps(self.model, batch, prefix_sharing=self.prefix_sharing, chunk_size=self.chunk_size)


class DisabledAdapters(Reference):
    def __init__(self, peft_model: torch.nn.Module, *, prefix_sharing: bool, chunk_size: int):
        self.model = peft_model
        self.prefix_sharing, self.chunk_size = prefix_sharing, chunk_size

    @torch.no_grad()
    def logps(self, batch) -> SequenceLogps:
        was_training = self.model.training
        # eval() so a non-zero lora_dropout cannot make the reference noisy.
        self.model.eval()
        with self.model.disable_adapter():
            out = forward_logps(self.model, batch, prefix_sharing=self.prefix_sharing, chunk_size=self.chunk_size)
        self.model.train(was_training)
        return out


class Precomputed(Reference):
    """Reference log-probs looked up by the batch's dataset positions. `scored` marks the positions computed so
    far (a run scores only the pairs its steps use); looking up any other is a bug, refused loudly."""

    def __init__(self, chosen: torch.Tensor, rejected: torch.Tensor, scored: torch.Tensor | None = None):
        self.chosen, self.rejected = chosen, rejected
        self.scored = torch.ones(len(chosen), dtype=torch.bool) if scored is None else scored.bool()

    def logps(self, batch) -> SequenceLogps:
        idx = batch.indices.cpu()
        if not bool(self.scored[idx].all()):
            missing = idx[~self.scored[idx]].tolist()
            raise RuntimeError(f"reference log-probs of dataset positions {missing[:8]} were not precomputed; the "
                               "run's steps should only use positions precompute() was given")
        dev = batch.chosen_ids.device
        return SequenceLogps(self.chosen[idx].to(dev), batch.chosen_mask.sum(-1).float(),
                             self.rejected[idx].to(dev), batch.rejected_mask.sum(-1).float())


def cache_key(model_id: str, pairs: Sequence[TokenizedPair], extra: dict) -> str:
    """Hash of everything the reference log-probs depend on: the model, the exact token ids of every pair in
    order, the precision. The ids are hashed as arrays (`preftune.data.store.pairs_digest`), fast at any size."""
    h = hashlib.sha256()
    h.update(json.dumps({"model": model_id, **extra}, sort_keys=True).encode())
    h.update(pairs_digest(pairs).encode())
    return h.hexdigest()[:20]


def model_identity(path: str) -> str:
    """A local folder is identified by its weight files' names, sizes and mtimes; a hub name by itself."""
    p = Path(path)
    if not p.is_dir():
        return path
    files = sorted(f for f in p.iterdir() if f.suffix in (".safetensors", ".bin", ".json"))
    return json.dumps([str(p.resolve())] + [[f.name, f.stat().st_size, int(f.stat().st_mtime)] for f in files])


def precompute(model: torch.nn.Module, pairs: Sequence[TokenizedPair], *, cache_file: Path, pad_id: int,
               batch_size: int, prefix_sharing: bool, chunk_size: int, autocast=None,
               progress: bool = False, save: bool = True, positions: np.ndarray | None = None) -> Precomputed:
    """Reference log-probs of the pairs at `positions` (all pairs when None), as many as `cache_file` holds
    loaded from it, the rest computed and added to it.

    The file holds full-length `chosen` and `rejected` vectors, with NaN where a pair is not scored yet, and
    `scored` (uint8, 1 = computed): a run scores only the pairs its steps use, a later run that needs more
    extends the same file. A file without `scored` (written before this) is complete.
    """
    n = len(pairs)
    chosen, rejected = torch.full((n,), float("nan")), torch.full((n,), float("nan"))
    scored = torch.zeros(n, dtype=torch.bool)
    if cache_file.is_file():
        t = load_file(str(cache_file))
        if t["chosen"].shape[0] == n:
            chosen, rejected = t["chosen"], t["rejected"]
            scored = t["scored"].bool() if "scored" in t else torch.ones(n, dtype=torch.bool)
    want = torch.arange(n) if positions is None else torch.as_tensor(np.asarray(positions, dtype=np.int64))
    missing = want[~scored[want]]
    if len(missing):
        from preftune.scoring import score

        todo = missing.tolist()
        subset = pairs.subset(todo) if hasattr(pairs, "subset") else [pairs[i] for i in todo]
        with without_adapters(model):
            out = score(model, subset, pad_id=pad_id, batch_size=batch_size, prefix_sharing=prefix_sharing,
                        chunk_size=chunk_size, autocast=autocast, progress=progress, desc="reference log-probs")
        chosen, rejected = chosen.clone(), rejected.clone()
        chosen[missing], rejected[missing] = out.chosen_logps, out.rejected_logps
        scored[missing] = True
        if save:  # else another process of the same job writes it
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(".tmp")
            save_file({"chosen": chosen, "rejected": rejected, "scored": scored.to(torch.uint8)}, str(tmp))
            tmp.replace(cache_file)
    return Precomputed(chosen, rejected, scored)


@dataclass
class ReferenceSetup:
    """The chosen strategy and what gives reference log-probs for the train and eval splits."""

    strategy: str  # copy, lora_disabled, precomputed or none
    train: Reference | None = None
    eval: Reference | None = None
    cache_file: Path | None = None  # the train split's precomputed cache (checkpoints link it)


def choose_strategy(requested: str, *, needs_reference: bool) -> str:
    """What `auto` means: precomputed (exact with dropout off, and no reference model stays in memory)."""
    if not needs_reference:
        return "none"
    return "precomputed" if requested == "auto" else requested


def build_reference(cfg: Any, *, model: torch.nn.Module, model_path: str, needs_reference: bool,
                    splits: dict[str, Sequence[TokenizedPair] | None], cache_path: Callable[[str, str], Path],
                    pad_id: int, device: torch.device, forward: dict[str, Any], autocast=None,
                    is_main_process: bool = True, say: Callable[[str], None] = print,
                    used: dict[str, Callable[[], np.ndarray]] | None = None) -> ReferenceSetup:
    """Build the reference `cfg.reference` asks for (a TrainConfig's reference, reference_model, dtype,
    mixed_precision, eval_batch_size, batch_size, progress, ... are read).

    `model` is the policy as it will be trained (a PeftModel when LoRA is on: its base weights are the
    reference). `splits` maps "train"/"eval" to their tokenized pairs (eval may be None); `cache_path(split,
    key)` names the precomputed cache file of a split; `forward` holds the forward options (prefix_sharing,
    chunk_size) the reference passes use. `used[split]()` gives the positions the run will use (the sampler
    knows them up front); only those are precomputed (all of a split without one).
    """
    strategy = choose_strategy(cfg.reference, needs_reference=needs_reference)
    if strategy == "none":
        return ReferenceSetup(strategy)
    if strategy == "lora_disabled":
        ref = DisabledAdapters(model, **forward)
        return ReferenceSetup(strategy, ref, ref)
    source = model
    if cfg.reference_model:
        from preftune.modeling.load import disable_dropout, load_model, resolve_model_path

        source = load_model(resolve_model_path(cfg.reference_model, cfg.allow_pickle), dtype=cfg.dtype,
                            attn_implementation=cfg.attn_implementation, trust_remote_code=cfg.trust_remote_code,
                            allow_pickle=cfg.allow_pickle).to(device)
        disable_dropout(source)
    if strategy == "copy":
        ref = FrozenModel(copy.deepcopy(source) if source is model else source, **forward)
        return ReferenceSetup(strategy, ref, ref)

    ident = model_identity(cfg.reference_model or model_path)
    extra = {"dtype": cfg.dtype, "mixed_precision": cfg.mixed_precision}
    setup = ReferenceSetup(strategy)
    for name, pairs in splits.items():
        if pairs is None:
            continue
        cache_file = cache_path(name, cache_key(ident, pairs, extra))
        positions = (used or {}).get(name)
        positions = positions() if positions is not None else None
        count = f"{len(pairs):,}" if positions is None else f"{len(positions):,} of {len(pairs):,}"
        say(f"reference log-probs for {count} {name} pairs → {cache_file.parent.name}/{cache_file.name}")
        ref = precompute(source, pairs, cache_file=cache_file, pad_id=pad_id,
                         batch_size=cfg.eval_batch_size or 2 * cfg.batch_size, autocast=autocast,
                         progress=cfg.progress, save=is_main_process, positions=positions, **forward)
        setattr(setup, name, ref)
        if name == "train":
            setup.cache_file = cache_file
    return setup
