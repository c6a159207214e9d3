"""AdamW over the trainable parameters, and the learning-rate schedule.

The schedule follows transformers' convention (get_scheduler's linear / cosine / constant_with_warmup):
the factor is step / warmup during warmup, so step 0 runs at learning rate 0 and the peak is reached at the
end of warmup; then cosine or linear decay to 0 at `total`, or constant. Written here (not imported) because
importing transformers.optimization pulls in the Trainer's stack at start-up; tests check it against
transformers' own schedules.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


def build_optimizer(params: Iterable[torch.nn.Parameter], *, lr: float, betas: tuple[float, float], eps: float,
                    weight_decay: float, **kernel: bool) -> torch.optim.AdamW:
    """`kernel`: AdamW's implementation switches (fused=True on CUDA: one kernel, no parameter-sized temporaries)."""
    return torch.optim.AdamW(list(params), lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **kernel)


def warmup_steps(ratio: float, total: int) -> int:
    """Warmup steps for a share `ratio` of `total` optimizer steps, rounded up as transformers does
    (TrainingArguments.get_warmup_steps: ceil(total × ratio)): 0.1 of 12 steps → 2."""
    return math.ceil(total * ratio)


def lr_factor(step: int, kind: str, warmup: int, total: int) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based)."""
    if step < warmup:
        return step / max(1, warmup)
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def lr_schedule(optimizer: torch.optim.Optimizer, kind: str, warmup: int, total: int):
    """A LambdaLR with `lr_factor` (kind: cosine, linear or constant)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, kind, warmup, total))
