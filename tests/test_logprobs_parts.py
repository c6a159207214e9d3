"""Which module the forward paths drive, and when the chunked vocabulary projection may replace the model's
own head (models that post-process logits need their own forward)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from preftune.logprobs import causal_lm, supports_chunked_head


class _LM(torch.nn.Module):
    def __init__(self, **config):
        super().__init__()
        self.config = SimpleNamespace(**config)
        self.head = torch.nn.Linear(2, 3)

    def get_output_embeddings(self):
        return self.head

    def get_decoder(self):
        return self


@pytest.mark.parametrize("config, ok", [
    ({}, True),
    ({"logit_scale": 1}, True),
    ({"logit_scale": 1.0}, True),
    ({"logit_scale": 2}, False),           # Cohere-style scaled logits
    ({"logit_scale": 0.5}, False),
    ({"final_logit_softcapping": 30.0}, False),  # Gemma-2-style soft-capped logits
    ({"final_logit_softcapping": None}, True),
])
def test_chunked_head_only_for_plain_projections(config, ok):
    assert supports_chunked_head(_LM(**config)) is ok


def test_no_chunked_head_without_a_head_or_a_decoder():
    no_head = _LM()
    no_head.get_output_embeddings = lambda: None
    assert not supports_chunked_head(no_head)

    class NoDecoder(torch.nn.Module):
        config = SimpleNamespace()

        def get_output_embeddings(self):
            return torch.nn.Linear(2, 3)

    assert not supports_chunked_head(NoDecoder())


def test_causal_lm_unwraps_ddp_style_and_peft_wrappers(tiny_model_dir):
    """DDP/accelerate keep the model in `.module` (twice here); PEFT's base model holds the injected LoRA layers."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)

    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.module = inner

    assert causal_lm(model) is model
    assert causal_lm(Wrapper(Wrapper(model))) is model
    peft = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    assert causal_lm(Wrapper(peft)) is peft.get_base_model()
