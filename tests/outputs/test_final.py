"""final/ from gathered weights (a sharded run) is the folder a one-process run writes."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from preftune.outputs.checkpoint import save_final


def _load(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)


def _same_files(a, b, name):
    wa, wb = load_file(str(a / "final" / name)), load_file(str(b / "final" / name))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert wa[k].dtype == wb[k].dtype and torch.equal(wa[k], wb[k]), k


def test_gathered_state_dict_writes_the_same_model(tiny_model_dir, tmp_path):
    """The weights are handed over as fp32 (FSDP2's master copies) and cast back to the bf16 they were loaded in."""
    model, tok = _load(tiny_model_dir)
    model = model.to(torch.bfloat16)
    dtypes = {k: v.dtype for k, v in model.state_dict().items()}
    gathered = {k: v.float().clone() for k, v in model.state_dict().items()}
    save_final(tmp_path / "a", model, tok, merge_lora=False)
    save_final(tmp_path / "b", model, tok, merge_lora=False, state_dict=gathered, dtypes=dtypes)
    _same_files(tmp_path / "a", tmp_path / "b", "model.safetensors")
    assert (tmp_path / "b" / "final" / "config.json").is_file() and (tmp_path / "b" / "final" / "tokenizer.json").is_file()


@pytest.mark.parametrize("merge", [False, True], ids=["adapters", "merged"])
def test_gathered_lora_state_dict_writes_the_same_adapters_or_merge(tiny_model_dir, tmp_path, merge):
    from preftune.modeling.load import add_lora

    model, tok = _load(tiny_model_dir)
    model = add_lora(model, r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    torch.manual_seed(0)
    with torch.no_grad():  # non-zero B, so a merge changes the weights
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    dtypes = {k: v.dtype for k, v in model.state_dict().items()}
    gathered = {k: v.clone() for k, v in model.state_dict().items()}
    save_final(tmp_path / "a", model, tok, merge_lora=merge)
    save_final(tmp_path / "b", model, tok, merge_lora=merge, state_dict=gathered, dtypes=dtypes)
    _same_files(tmp_path / "a", tmp_path / "b", "model.safetensors" if merge else "adapter_model.safetensors")
