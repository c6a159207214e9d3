"""gradient_checkpointing: true really recomputes activations (issue 16: switching it off silently passed,
because the old test only checked that step 1's loss is ln 2, which holds for any policy equal to its
reference)."""

from __future__ import annotations

import pytest

from preftune import TrainConfig, train
from preftune.callbacks import Callback


class FirstStepMLPCalls(Callback):
    """Counts calls of the decoder MLP's forward during the first optimizer step: activation checkpointing
    runs each checkpointed layer's forward once more in backward, so the count doubles when it is on.

    The count is taken on the class's forward, not with a module hook: transformers checkpoints `forward`
    and keeps a layer's hooks outside the checkpoint, and a hook on an inner module did not fire again in the
    recomputation either (seen with torch 2.13)."""

    def __init__(self, monkeypatch) -> None:
        self.monkeypatch = monkeypatch
        self.calls = 0
        self.counting = False
        self.flag = None

    def on_train_begin(self, state) -> None:
        from preftune.logprobs import causal_lm

        lm = causal_lm(state.model)
        self.flag = getattr(lm, "is_activation_checkpointing", None)
        mlp_cls = type(lm.get_decoder().layers[0].mlp)
        original = mlp_cls.forward

        def counted(module, *args, **kwargs):
            if self.counting:
                self.calls += 1
            return original(module, *args, **kwargs)

        self.monkeypatch.setattr(mlp_cls, "forward", counted)
        self.counting = True

    def on_step_end(self, state) -> None:
        self.counting = False


def _run(tiny_model_dir, pairs_file, out, monkeypatch, **kw) -> FirstStepMLPCalls:
    counter = FirstStepMLPCalls(monkeypatch)
    train(TrainConfig(model=str(tiny_model_dir), data=str(pairs_file), output_dir=str(out), max_steps=1,
                      batch_size=4, progress=False, max_length=64, max_prompt_length=32, **kw), callbacks=[counter])
    monkeypatch.undo()
    return counter


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_checkpointing_recomputes_every_layer_in_backward(tiny_model_dir, pairs_file, tmp_path, monkeypatch, lora):
    """Step 1 with a precomputed reference: only the policy's forward runs, one batch of rows over 2 layers
    (prefix sharing off in both runs: checkpointing turns it off anyway, and its prompt pass would otherwise
    make the 'off' count double too). Off: one MLP call per layer, 2; on: each layer's forward again in
    backward, 4; and the model says it is checkpointing."""
    off = _run(tiny_model_dir, pairs_file, tmp_path / "off", monkeypatch, lora=lora, prefix_sharing=False)
    on = _run(tiny_model_dir, pairs_file, tmp_path / "on", monkeypatch, lora=lora, prefix_sharing=False,
              gradient_checkpointing=True)
    assert off.flag is not True and off.calls == 2
    assert on.flag is True and on.calls == 4
