"""Reference strategies: where πref's log-probs come from.

- `copy`: a frozen second copy of the starting model (full fine-tuning).
- `lora_disabled`: the policy itself with its LoRA adapters switched off: the base weights under the
  adapters *are* the reference, so no second copy is held in memory.
- `precomputed`: the reference's log-probs for every pair, computed once in inference mode before
  training, stored in the run folder and reused by later runs (and resumes) with the same model, data
  and tokenization; the reference model is freed afterwards. Exact as long as dropout is off.
- `none`: reference-free losses (SimPO).
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from preftune.data.tokenize import TokenizedPair
from preftune.logprobs import SequenceLogps, forward_logps


class Reference:
    """Gives reference log-probs for a batch (always without gradients)."""

    def logps(self, batch) -> SequenceLogps:
        raise NotImplementedError


class FrozenModel(Reference):
    def __init__(self, model: torch.nn.Module, *, prefix_sharing: bool, chunk_size: int):
        self.model = model.eval().requires_grad_(False)
        self.prefix_sharing, self.chunk_size = prefix_sharing, chunk_size

    @classmethod
    def copy_of(cls, model: torch.nn.Module, **kw) -> FrozenModel:
        return cls(copy.deepcopy(model), **kw)

    @torch.no_grad()
    def logps(self, batch) -> SequenceLogps:
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
    """Reference log-probs looked up by the batch's dataset positions."""

    def __init__(self, chosen: torch.Tensor, rejected: torch.Tensor):
        self.chosen, self.rejected = chosen, rejected

    def logps(self, batch) -> SequenceLogps:
        idx = batch.indices.cpu()
        dev = batch.chosen_ids.device
        return SequenceLogps(self.chosen[idx].to(dev), batch.chosen_mask.sum(-1).float(),
                             self.rejected[idx].to(dev), batch.rejected_mask.sum(-1).float())


def cache_key(model_id: str, pairs: Sequence[TokenizedPair], extra: dict) -> str:
    """Hash of everything the reference log-probs depend on: the model, the exact token ids, the precision."""
    h = hashlib.sha256()
    h.update(json.dumps({"model": model_id, **extra}, sort_keys=True).encode())
    for p in pairs:
        h.update(json.dumps([p.prompt_ids, p.chosen_ids, p.rejected_ids]).encode())
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
               progress: bool = False, save: bool = True) -> Precomputed:
    """Reference log-probs for all pairs, loaded from `cache_file` when it exists, else computed and saved."""
    if cache_file.is_file():
        t = load_file(str(cache_file))
        if t["chosen"].shape[0] == len(pairs):
            return Precomputed(t["chosen"], t["rejected"])
    from preftune.scoring import score

    out = score(model, pairs, pad_id=pad_id, batch_size=batch_size, prefix_sharing=prefix_sharing,
                chunk_size=chunk_size, autocast=autocast, progress=progress, desc="reference log-probs")
    chosen, rejected = out.chosen_logps, out.rejected_logps
    if not save:  # another process of the same job writes it
        return Precomputed(chosen, rejected)
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_suffix(".tmp")
    save_file({"chosen": chosen, "rejected": rejected}, str(tmp))
    tmp.replace(cache_file)
    return Precomputed(chosen, rejected)
