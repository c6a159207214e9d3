"""TR-DPO's moving reference (Gorbatovski et al. 2024, "Learn Your Reference Model for Real Good Alignment",
arXiv 2404.09656; TRL: `sync_ref_model`, `ref_model_mixup_alpha`, `ref_model_sync_steps`).

Every τ optimizer steps, after the update, the reference's weights move toward the policy's:

    θ_ref ← α·θ + (1 − α)·θ_ref        (α = 1: the policy is copied, the paper's "hard" update)

on every parameter, as TRL's SyncRefModelCallback does (buffers such as rotary frequencies are not weights and
stay). Each process moves its own copy by the same rule from the same policy, so they stay identical.

The moved weights are the one piece of run state that no earlier step can rebuild, so a checkpoint holds them
(`checkpoint_file`: written into the run folder when a checkpoint asks, linked into it like a precomputed cache)
and a resume loads them back (`load`): a resumed run moves the same reference as an uninterrupted one.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from preftune.errors import PreftuneError


class ReferenceSync:
    """Moves `reference` (a frozen model) toward `policy` (the model being trained) every `every` steps by
    `alpha`; both must have the same parameters (names and shapes)."""

    def __init__(self, reference: torch.nn.Module, policy: torch.nn.Module, *, alpha: float, every: int,
                 weights_file: Path, is_main_process: bool = True):
        ref, pol = dict(reference.named_parameters()), dict(policy.named_parameters())
        mismatch = [n for n in ref.keys() | pol.keys() if n not in ref or n not in pol or ref[n].shape != pol[n].shape]
        if mismatch:
            raise PreftuneError(f"sync_ref_model (TR-DPO) mixes the policy's weights into the reference's, but they "
                                f"differ (e.g. {sorted(mismatch)[0]!r}); use a reference_model of the same "
                                "architecture and size, or drop reference_model.")
        self.pairs = [(ref[n], pol[n]) for n in ref]
        self.names = list(ref)
        self.alpha, self.every = alpha, every
        self.weights_file, self.is_main_process = weights_file, is_main_process
        self._saved = False  # whether weights_file holds the reference as it is now

    def end_step(self, step: int) -> None:
        """After optimizer step `step` (1-based): move the reference when τ divides it."""
        if step % self.every:
            return
        with torch.no_grad():
            for ref, pol in self.pairs:
                ref.mul_(1.0 - self.alpha).add_(pol.detach().to(ref.dtype), alpha=self.alpha)
        self._saved = False

    def checkpoint_file(self) -> Path:
        """The reference's current weights as a file (written by the main process when they moved since the last
        write; a new file each time, so a checkpoint that linked the old one keeps it)."""
        if self.is_main_process and not self._saved:
            self.weights_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.weights_file.with_name(".tmp-" + self.weights_file.name)  # the run folder removes .tmp-*
            save_file({n: ref.detach().contiguous().cpu() for n, (ref, _) in zip(self.names, self.pairs)}, str(tmp))
            tmp.replace(self.weights_file)
        self._saved = True
        return self.weights_file

    def load(self, checkpoint: Path) -> None:
        """Put back the reference a checkpoint saved (every process)."""
        path = checkpoint / self.weights_file.name
        if not path.is_file():
            raise PreftuneError(f"checkpoint {checkpoint} holds no TR-DPO reference ({path.name}): it was written "
                                "without sync_ref_model; resume with the settings it was written with, or start "
                                "again without --resume.")
        tensors = load_file(str(path))
        if set(tensors) != set(self.names):
            raise PreftuneError(f"{path} holds the weights of another model; start again without --resume.")
        with torch.no_grad():
            for name, (ref, _) in zip(self.names, self.pairs):
                ref.copy_(tensors[name])
        self._saved = False
