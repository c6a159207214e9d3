"""merge_lora writes W + (α/r)·B·A into final/ (issue 16: replacing the merge by an unload, which drops the
adapters and writes the untouched base weights, passed the old test, which only checked which files exist)."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from preftune import TrainConfig, train
from preftune.callbacks import Callback

R, ALPHA = 4, 12  # scale α/r = 3, not the default 32/16 = 2, so a merge with the wrong scale shows too


class AdapterCapture(Callback):
    """The trained adapters, read from the live PeftModel after final/ was written."""

    def on_train_end(self, state) -> None:
        self.params = {n: p.detach().clone() for n, p in state.model.named_parameters()}


def test_merged_weights_are_base_plus_scaled_b_times_a(tiny_model_dir, pairs_file, tmp_path):
    """For every adapted Linear, final/ holds W0 + (α/r)·B·A (B [out, r], A [r, in]), computed here in float64
    from the initial weights and the trained adapters; every other tensor is W0 unchanged. fp32 merge vs
    float64 expectation: measured ≤ 6e-9 apart; 1e-6 tolerance. The adapters' contribution is checked to be
    far above that (max |(α/r)·B·A| > 1e-3; measured 0.02 after 2 steps at lr 1e-2), so an unload cannot pass."""
    cap = AdapterCapture()
    res = train(TrainConfig(model=str(tiny_model_dir), data=str(pairs_file), output_dir=str(tmp_path / "run"),
                            max_steps=2, batch_size=4, learning_rate=1e-2, warmup_ratio=0.0, progress=False,
                            max_length=64, max_prompt_length=32, lora=True, lora_r=R, lora_alpha=ALPHA,
                            merge_lora=True), callbacks=[cap])
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    merged = load_file(str(res.final_dir / "model.safetensors"))
    assert merged.keys() == base.keys()

    adapted = 0
    for name, w0 in base.items():
        module = name.removesuffix(".weight")
        a = cap.params.get(f"base_model.model.{module}.lora_A.default.weight")
        b = cap.params.get(f"base_model.model.{module}.lora_B.default.weight")
        if a is None:
            torch.testing.assert_close(merged[name], w0, atol=0, rtol=0, msg=name)
            continue
        adapted += 1
        delta = (ALPHA / R) * (b.double() @ a.double())
        assert delta.abs().max() > 1e-3, name
        torch.testing.assert_close(merged[name].double(), w0.double() + delta, atol=1e-6, rtol=0, msg=name)
    assert adapted == 14  # all-linear on 2 Llama layers: q, k, v, o, gate, up, down each (lm_head excluded)
