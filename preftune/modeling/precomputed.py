"""The precomputed reference: log-probs scored once before training, cached in the run folder and looked up by
dataset position (`precompute`, `Precomputed`), and what every reference strategy shares (`Reference`,
`without_adapters`, `Placement`). modeling/reference.py picks the strategy and builds it.

A cache file is keyed by the model, the exact token ids and the settings that change the values beyond fp32
rounding (`cache_key`, `cache_settings`); it holds the scored positions' summed log-probs (NaN elsewhere) and
which positions are scored, so later runs extend it; `cache_problem` refuses an implausible file.
"""

from __future__ import annotations

import contextlib
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
from preftune.errors import PreftuneError
from preftune.logprobs import ForwardPlan, SequenceLogps, handle_model, statistics_only, unwrap_handle
from preftune.scoring import score

# What a reference pass computes beyond the sums: LD-DPO's shared-length sums when the plan asks; never WPO's
# statistic, which weighs pairs by the policy alone.
REFERENCE_STATISTICS = frozenset({"shared"})


class Reference:
    """Gives reference log-probs for a batch (always without gradients)."""

    def logps(self, batch) -> SequenceLogps:
        raise NotImplementedError


def without_adapters(model: torch.nn.Module) -> contextlib.AbstractContextManager:
    """The base model's forward: LoRA adapters switched off for a PeftModel, nothing to do otherwise."""
    return model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()


class Precomputed(Reference):
    """Reference log-probs looked up by the batch's dataset positions. `scored` marks the positions computed so
    far (a run scores only the pairs its steps use); looking up any other is a bug, refused loudly. `shared`:
    the (chosen, rejected) sums over each pair's first min(|c|, |r|) answer tokens (LD-DPO), when kept.
    `rejected` is None for unpaired examples (one answer each, in `chosen`)."""

    def __init__(self, chosen: torch.Tensor, rejected: torch.Tensor | None, scored: torch.Tensor | None = None,
                 shared: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.chosen, self.rejected, self.shared = chosen, rejected, shared
        self.scored = torch.ones(len(chosen), dtype=torch.bool) if scored is None else scored.bool()

    def logps(self, batch) -> SequenceLogps:
        idx = batch.indices.cpu()
        if not bool(self.scored[idx].all()):
            missing = idx[~self.scored[idx]].tolist()
            raise RuntimeError(f"reference log-probs of dataset positions {missing[:8]} were not precomputed; the "
                               "run's steps should only use positions precompute() was given")
        dev = batch.chosen_ids.device
        shared = {}
        if self.shared is not None:
            shared = {"chosen_shared_logps": self.shared[0][idx].to(dev),
                      "rejected_shared_logps": self.shared[1][idx].to(dev)}
        if self.rejected is None:
            return SequenceLogps(self.chosen[idx].to(dev), batch.chosen_mask.sum(-1).float(), desirable=batch.desirable)
        return SequenceLogps(self.chosen[idx].to(dev), batch.chosen_mask.sum(-1).float(),
                             self.rejected[idx].to(dev), batch.rejected_mask.sum(-1).float(), **shared)

    def tensors(self) -> dict[str, torch.Tensor]:
        """What a cache file holds."""
        out = {"chosen": self.chosen, "scored": self.scored.to(torch.uint8)}
        if self.rejected is not None:
            out["rejected"] = self.rejected
        if self.shared is not None:
            out["chosen_shared"], out["rejected_shared"] = self.shared
        return out


# Bumped when what a cache file holds changes meaning, so older files are never read as the new kind
# (3: partial files, with `scored`).
CACHE_FORMAT = 3


def cache_key(model_id: str, pairs: Sequence[TokenizedPair], extra: dict) -> str:
    """Hash of everything that changes the reference log-probs beyond float rounding: the model, the exact token
    ids (and so their count), and what `extra` holds (`cache_settings`: the precision, remote model code, and in
    half precision the forward path). Batch size and logits chunks only change the last bits, and are left out so
    that a resume which changes them reuses the very values the run started with."""
    h = hashlib.sha256()
    h.update(json.dumps({"model": model_id, "format": CACHE_FORMAT, "pairs": len(pairs), **extra},
                        sort_keys=True).encode())
    h.update(pairs_digest(pairs).encode())  # the exact token ids of every pair, in order
    return h.hexdigest()[:20]


def cache_settings(plan: ForwardPlan, *, dtype: str, mixed_precision: str, trust_remote_code: bool) -> dict[str, Any]:
    """The settings of a reference pass that change its values: dtype, mixed precision, remote model code, and
    in half precision (bf16/fp16 weights or autocast) the forward path, whose different summation orders then
    differ by up to 2.3e-2 per sequence (KV cache vs packed, bf16): a cache from another path would make the
    step-1 rewards non-zero. In fp32 the paths agree to ~1e-6, and a resume that changes the path reuses the
    cache."""
    extra = {"dtype": dtype, "mixed_precision": mixed_precision, "trust_remote_code": trust_remote_code}
    if dtype in ("bfloat16", "float16") or mixed_precision in ("bf16", "fp16"):
        extra["forward"] = plan.values_key()
    return extra


_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth")


def _sampled_digest(path: Path, blocks: int = 64, block: int = 16384) -> str:
    """SHA-256 of `blocks` evenly spaced blocks of a file (1 MiB read, whatever its size)."""
    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f:
        for k in range(blocks):
            f.seek(size * k // blocks)
            h.update(f.read(block))
    return h.hexdigest()[:16]


def model_identity(path: str) -> str:
    """What the model at `path` is, as JSON text. A local folder: the content hash of its .json files (config,
    index) and of its .py files (remote model code), and for each weight file that loads (its safetensors when it
    has any, as modeling/load.py prefers them always; else its pickles) its size, mtime in nanoseconds and a hash
    of 1 MiB sampled across it (hashing many GB whole would take minutes; a rewritten file has a new mtime, and
    two saves in the same second differ in their samples). No path, so a folder moved or copied with its times
    (mv, cp -p) stays the same model. A hub name: the name and the commit of the revision in the local cache
    (the one that loads), or the name alone when none is cached."""
    p = Path(path)
    if not p.is_dir():
        commit = _hub_commit(path)
        return json.dumps({"hub": path, "commit": commit}, sort_keys=True) if commit else path
    weights = [f for f in p.iterdir() if f.suffix in _WEIGHTS and f.is_file()]
    loaded = {f for f in weights if f.suffix == ".safetensors"} or set(weights)
    files: dict[str, Any] = {}
    for f in sorted(p.iterdir()):
        if f.suffix in (".json", ".py") and f.is_file():
            files[f.name] = hashlib.sha256(f.read_bytes()).hexdigest()[:16]
        elif f in loaded:
            files[f.name] = [f.stat().st_size, f.stat().st_mtime_ns, _sampled_digest(f)]
    return json.dumps(files, sort_keys=True)


def _hub_commit(name: str) -> str | None:
    """The commit of the cached revision (refs/main) of hub model `name`, or None."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(name, "config.json")
    except Exception:  # not a repository name
        return None
    return Path(found).parent.name if isinstance(found, str) else None


_SHARED = ("chosen_shared", "rejected_shared")


def cache_problem(tensors: dict[str, torch.Tensor], n: int, paired: bool = True) -> str | None:
    """Why stored reference log-probs cannot be right for `n` pairs (`paired`) or unpaired examples, or None.
    `scored` (1 = computed; absent in a complete file) marks the pairs a run has scored so far, the others are
    NaN. Scored summed log-probs are finite and <= 0, and never all exactly 0 (that is what a pass that scored
    nothing leaves behind). `chosen_shared`, `rejected_shared` (LD-DPO's sums over each pair's shorter length)
    come both or neither. Unpaired examples have one answer each: `chosen` and no `rejected`."""
    if not paired:
        if set(tensors) != {"chosen", "scored"} and set(tensors) != {"chosen"}:
            return f"it holds {sorted(tensors)} instead of chosen (and scored) for unpaired examples"
    elif not {"chosen", "rejected"} <= set(tensors) <= {"chosen", "rejected", "scored", *_SHARED}:
        return f"it holds {sorted(tensors)} instead of chosen, rejected (and scored)"
    if len(set(_SHARED) & set(tensors)) == 1:
        return "it holds one of chosen_shared, rejected_shared without the other"
    scored = tensors.get("scored")
    if scored is not None and tuple(scored.shape) != (n,):
        return f"it marks {tuple(scored.shape)} scored values for {n} pairs"
    done = torch.ones(n, dtype=torch.bool) if scored is None else scored.bool()
    for name in ("chosen", *(k for k in ("rejected", *_SHARED) if k in tensors)):
        t = tensors[name]
        if tuple(t.shape) != (n,):
            return f"it holds {tuple(t.shape)} {name} values for {n} pairs"
        t = t[done]
        if not t.is_floating_point() or not torch.isfinite(t).all():
            return f"its {name} values are not all finite numbers"
        if (t > 1e-3).any():  # log-probs are <= 0; 1e-3 leaves room for rounding
            return f"it holds positive {name} log-probabilities"
    if bool(done.any()) and all(bool((tensors[k][done] == 0).all()) for k in ("chosen", "rejected") if k in tensors):
        return "it holds only zeros"
    return None


def _read_cache(cache_file: Path, n: int, say: Callable[[str], None], shared: bool = False,
                paired: bool = True) -> Precomputed | None:
    try:
        tensors = load_file(str(cache_file))
        problem = cache_problem(tensors, n, paired)
    except Exception as e:  # a truncated or foreign file: safetensors raises its own error type
        problem = f"it is unreadable: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    if problem is None and shared and _SHARED[0] not in tensors:
        problem = "it has no shared-length sums, which ld_alpha needs"
    if problem is None:
        kept = (tensors[_SHARED[0]], tensors[_SHARED[1]]) if shared else None
        return Precomputed(tensors["chosen"], tensors.get("rejected"), tensors.get("scored"), kept)
    say(f"reference cache {cache_file.name} is unusable ({problem}); computing it again")
    return None


def precompute(handle: torch.nn.Module, pairs: Sequence[TokenizedPair], *, cache_file: Path, pad_id: int,
               batch_size: int, autocast=None, progress: bool = False, save: bool = True,
               say: Callable[[str], None] = print, placement: Placement | None = None,
               positions: np.ndarray | None = None) -> Precomputed:
    """Reference log-probs of the pairs at `positions` (all pairs when None) under `handle` (a LogpsModel, with
    its adapters switched off when it runs a PeftModel): as many as `cache_file` holds loaded from it (when it
    is plausible), the rest computed, checked and added to it.

    The file holds full-length `chosen` and `rejected` vectors, with NaN where a pair is not scored yet, and
    `scored` (uint8, 1 = computed): a run scores only the pairs its steps use, a later run that needs more
    extends the same file. When the handle's plan asks for LD-DPO's shared-length sums, the file holds them too
    (`chosen_shared`, `rejected_shared`; a file without them is computed again). Under several processes each
    scores its share of the missing pairs and the shares are gathered (scoring.score), so every process ends
    with all of them; only the main process writes (`save`).
    """
    placement = placement or Placement()
    n = len(pairs)
    plan = getattr(unwrap_handle(handle), "plan", None)
    shared = plan is not None and "shared" in plan.statistics
    paired = not n or pairs[0].rejected_ids is not None
    cached = _read_cache(cache_file, n, say, shared, paired) if cache_file.is_file() else None
    # Every process must take the same branch: scoring is collective (the gather, and under sharding
    # every forward), and a run folder on node-local disks may hold the cache for some processes only.
    if not _everywhere(cached is not None, placement):
        cached = None
    if cached is None:
        nan = torch.full((n,), float("nan"))
        cached = Precomputed(nan, nan.clone() if paired else None, torch.zeros(n, dtype=torch.bool),
                             (nan.clone(), nan.clone()) if shared else None)
    want = torch.arange(n) if positions is None else torch.as_tensor(np.asarray(positions, dtype=np.int64))
    missing = want[~cached.scored[want]]
    if not len(missing):
        return cached

    todo = missing.tolist()
    subset = pairs.subset(todo) if hasattr(pairs, "subset") else [pairs[i] for i in todo]
    with without_adapters(handle_model(handle)), statistics_only(handle, REFERENCE_STATISTICS):
        out = score(handle, subset, pad_id=pad_id, batch_size=batch_size, autocast=autocast, progress=progress,
                    desc="reference log-probs", rank=placement.rank, world=placement.world, device=placement.device)
    finite = torch.isfinite(out.chosen_logps) & (torch.isfinite(out.rejected_logps) if paired else True)
    bad = [subset[i].index for i in torch.nonzero(~finite).flatten().tolist()]
    if bad:
        raise PreftuneError(f"the reference model gave non-finite log-probs for {len(bad)} pairs (e.g. examples "
                            f"{bad[:5]}); load it in float32 or bfloat16 (float16 overflows), or check the model.")
    tensors = {k: v.clone() for k, v in cached.tensors().items()}
    tensors["chosen"][missing] = out.chosen_logps
    if paired:
        tensors["rejected"][missing] = out.rejected_logps
    if shared:
        tensors["chosen_shared"][missing] = out.chosen_shared_logps
        tensors["rejected_shared"][missing] = out.rejected_shared_logps
    tensors["scored"][missing] = 1
    problem = cache_problem(tensors, n, paired)
    if problem is not None:  # a scoring pass that left values unset: a bug, never stored
        raise RuntimeError(f"reference log-probs for {n} pairs are impossible: {problem}")
    if save:  # else another process of the same job writes it
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(".tmp-" + cache_file.name)  # the run folder removes `.tmp-*` after a failed save
        save_file(tensors, str(tmp))
        tmp.replace(cache_file)
    return Precomputed(tensors["chosen"], tensors.get("rejected"), tensors["scored"],
                       (tensors["chosen_shared"], tensors["rejected_shared"]) if shared else None)


@dataclass
class Placement:
    """Where the reference's forward passes run: this process's `rank` of `world`, and under FSDP2/ZeRO-3
    (`sharded`) `wrap_frozen`, which shards a frozen LogpsModel like the policy and returns it
    (distributed.Engine.prepare_frozen)."""

    rank: int = 0
    world: int = 1
    sharded: bool = False
    device: torch.device | None = None
    wrap_frozen: Callable[[torch.nn.Module], torch.nn.Module] | None = None


def _everywhere(flag: bool, placement: Placement) -> bool:
    """True when `flag` holds on every process."""
    if placement.world == 1:
        return flag
    import torch.distributed as dist

    t = torch.tensor([int(flag)], device=placement.device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())
