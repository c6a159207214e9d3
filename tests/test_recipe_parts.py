"""The recipe's small helpers by hand: the context cap, seeding, the stop request."""

from __future__ import annotations

import random
import signal

import numpy as np
import pytest
import torch

from preftune import TrainConfig
from preftune.recipe import _StopRequest, fit_to_context, seed_everything


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(model="m", data="d.jsonl", output_dir="o", **kw)


@pytest.mark.parametrize("length, prompt, limit, want, said", [
    (1024, 512, None, (1024, 512), None),    # the model does not say: unchanged
    (256, 128, 256, (256, 128), None),       # fits exactly: unchanged
    (300, 100, 256, (256, 100), "max_length 300 is more than the model's 256 positions: capped it to 256"),
    (300, 256, 256, (256, 128), "and max_prompt_length 256 to 128"),  # a prompt of all positions: half
    (1024, 512, 256, (256, 128), "and max_prompt_length 512 to 128"),
])
def test_fit_to_context(length, prompt, limit, want, said):
    lines: list[str] = []
    out = fit_to_context(_cfg(max_length=length, max_prompt_length=prompt), limit, lines.append)
    assert (out.max_length, out.max_prompt_length) == want
    if said is None:
        assert lines == []
    else:
        assert len(lines) == 1 and said in lines[0]
        assert ("max_prompt_length" in lines[0]) == (want[1] != prompt)


def test_seed_everything_seeds_python_numpy_and_torch():
    seed_everything(11)
    got = (random.random(), float(np.random.rand()), torch.rand(1).item())
    want = (random.Random(11).random(), float(np.random.RandomState(11).rand()),
            torch.rand(1, generator=torch.Generator().manual_seed(11)).item())
    assert got == want


def test_stop_request_flags_the_first_signal_and_raises_on_the_second():
    before = signal.getsignal(signal.SIGTERM)
    with _StopRequest() as stop:
        assert stop.signal is None
        signal.raise_signal(signal.SIGTERM)
        assert stop.signal == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is before
