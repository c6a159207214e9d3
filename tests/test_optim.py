"""The learning-rate schedule's warmup length from warmup_ratio, against transformers (TrainingArguments'
get_warmup_steps, then get_scheduler): the ceiling of ratio × steps, not its rounding."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from preftune.optim import lr_schedule, warmup_steps


@pytest.mark.parametrize("ratio, total, want", [
    (0.1, 12, 2),   # 1.2 → 2 (rounding gave 1)
    (0.1, 1, 1),    # 0.1 → 1: a 1-step run starts at learning rate 0
    (0.25, 8, 2),   # exactly 2
    (0.05, 7, 1),   # 0.35 → 1 (rounding gave 0)
    (0.0, 10, 0),
])
def test_warmup_from_ratio_is_transformers_ceiling(ratio, total, want):
    """The same count as transformers (where warmup_steps < 1 is a ratio), then the same learning rate at
    every step as its get_scheduler with that count."""
    from transformers import TrainingArguments, get_scheduler

    theirs = TrainingArguments.get_warmup_steps(SimpleNamespace(warmup_steps=ratio), total)
    assert warmup_steps(ratio, total) == theirs == want

    def lrs(make):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched, out = make(opt), []
        for _ in range(total):
            out.append(sched.get_last_lr()[0])
            opt.step()
            sched.step()
        return out

    ours = lrs(lambda o: lr_schedule(o, "linear", warmup_steps(ratio, total), total))
    assert ours == pytest.approx(lrs(lambda o: get_scheduler("linear", o, num_warmup_steps=theirs,
                                                             num_training_steps=total)), abs=1e-12)
