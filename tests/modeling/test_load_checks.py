"""Model loading never trains a silently random model: missing weights are an error, unused ones are said, a
missing attention package, broken weights and a too-small vocabulary are one sentence."""

from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch

from preftune import TrainConfig, train
from preftune.errors import PreftuneError
from preftune.modeling.load import load_model


def _cfg(model, data, out, **kw) -> TrainConfig:
    base = dict(model=str(model), data=str(data), output_dir=str(out), max_steps=1, batch_size=4, progress=False,
                max_length=64, max_prompt_length=32)
    return TrainConfig(**{**base, **kw})


def test_config_naming_another_architecture_is_refused(tiny_model_dir, pairs_file, tmp_path):
    """Llama weights under a GPT-2 config.json: transformers would leave every GPT-2 weight at its random init."""
    from transformers import GPT2Config

    folder = tmp_path / "m"
    shutil.copytree(tiny_model_dir, folder)
    vocab = json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
    GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4).save_pretrained(folder)
    with pytest.raises(PreftuneError, match=r"does not match its config.json \(GPT2LMHeadModel\): \d+ of its \d+ "
                                            r"weights are missing from the folder .*would start from random values"):
        train(_cfg(folder, pairs_file, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_a_missing_weight_is_refused(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "m"
    shutil.copytree(tiny_model_dir, folder)
    weights = load_file(str(folder / "model.safetensors"))
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(PreftuneError, match=r"1 of its \d+ weights are missing .*model.layers.1.mlp.up_proj.weight"):
        load_model(str(folder))


def test_unused_weights_are_said_in_one_line(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "m"
    shutil.copytree(tiny_model_dir, folder)
    weights = load_file(str(folder / "model.safetensors"))
    weights["score.weight"] = torch.zeros(2, 32)
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    said = []
    load_model(str(folder), say=said.append)
    assert said == [f"note: 1 weights in {folder} are not used by LlamaForCausalLM (e.g. score.weight)"]


def test_tied_embeddings_are_not_missing(tmp_path):
    """lm_head shares the input embedding: the folder holds it once, and nothing is missing."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "tied", safe_serialization=True)
    said = []
    model = load_model(str(tmp_path / "tied"), say=said.append)
    assert model.lm_head.weight is model.model.embed_tokens.weight and said == []


def test_missing_attention_package_is_one_sentence(tiny_model_dir):
    try:
        import flash_attn  # noqa: F401
        pytest.skip("flash-attn is installed here")
    except ImportError:
        pass
    with pytest.raises(PreftuneError, match="a package it needs is missing .*--attn-implementation sdpa"):
        load_model(str(tiny_model_dir), attn_implementation="flash_attention_2")


@pytest.mark.parametrize("spoil", [lambda b: b[: len(b) // 2], lambda b: b"garbage" * 3], ids=["truncated", "garbage"])
def test_broken_weights_are_one_sentence(tiny_model_dir, tmp_path, spoil):
    folder = tmp_path / "m"
    shutil.copytree(tiny_model_dir, folder)
    w = folder / "model.safetensors"
    w.write_bytes(spoil(w.read_bytes()))
    with pytest.raises(PreftuneError, match=f"could not load model {folder} \\(.*deserializ"):
        load_model(str(folder))


def test_vocabulary_smaller_than_the_tokenizer_is_refused(tiny_model_dir, pairs_file, tmp_path):
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "m"
    shutil.copytree(tiny_model_dir, folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    model.resize_token_embeddings(100)
    model.save_pretrained(folder, safe_serialization=True)
    with pytest.raises(PreftuneError, match=r"the model's vocabulary has 100 tokens but the tokenizer gives token id "
                                            r"[\d,]+ \(it has [\d,]+ tokens\); the tokenizer does not belong"):
        train(_cfg(folder, pairs_file, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def _variant(src, folder, **values):
    shutil.copytree(src, folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, **values}))
    return folder


@pytest.mark.parametrize("values, needle", [
    ({"num_hidden_layers": "3"}, 'gives num_hidden_layers = "3"; it must be a whole number of at least 1'),
    ({"vocab_size": -5}, "gives vocab_size = -5; it must be a whole number"),
    ({"num_hidden_layers": 1_000_000}, "gives 1,000,000 layers; no causal LM has more than a few hundred"),
    ({"hidden_size": 32_000}, r"describes a model of at least 4,115,744,000 parameters \(2 layers of width 32000\) "
                              "but the weights in .* hold 41,"),
], ids=["text", "negative", "layers", "larger-than-the-weights"])
def test_implausible_configs_are_refused_before_anything_is_built(tiny_model_dir, tmp_path, values, needle):
    """Before the tokenizer, the model or `plan`'s meta-device count reads the config: a value no model has is
    one sentence (a config of 1,000,000 layers would otherwise be built for minutes). Width 32000 for the tiny
    model's 2 layers, intermediate 64, vocabulary 361: at least 2·(2·32000² + 2·32000·64) + 361·32000 =
    4,104,192,000 + 11,552,000 = 4,115,744,000 parameters, against the 41 thousand its weights hold."""
    from preftune.memory_plan import load_shape
    from preftune.modeling.load import resolve_model_path

    folder = _variant(tiny_model_dir, tmp_path / "m", **values)
    for call in (lambda: resolve_model_path(str(folder)), lambda: load_shape(str(folder))):
        with pytest.raises(PreftuneError, match=needle):
            call()


def test_safetensors_load_whatever_else_is_there(tiny_model_dir, tmp_path):
    """--allow-pickle with a pytorch_model.bin (all zeros) beside model.safetensors: the safetensors load, and the
    identity the reference cache is keyed by names them alone; a .py file (remote code) is part of it. A pickle
    that is not a state dict is one sentence."""
    from safetensors.torch import load_file

    from preftune.modeling.reference import model_identity

    folder = tmp_path / "both"
    shutil.copytree(tiny_model_dir, folder)
    weights = load_file(str(folder / "model.safetensors"))
    torch.save({k: torch.zeros_like(v) for k, v in weights.items()}, folder / "pytorch_model.bin")
    model = load_model(str(folder), allow_pickle=True, say=None)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.detach(), weights[name], rtol=0, atol=0)
    before = model_identity(str(folder))
    assert "model.safetensors" in before and "pytorch_model.bin" not in before
    (folder / "modeling_x.py").write_text("X = 1\n")
    assert model_identity(str(folder)) != before and "modeling_x.py" in model_identity(str(folder))
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(folder, protocol=2))  # a PosixPath, not tensors
    with pytest.raises(PreftuneError, match="its pickle file holds something other than weights"):
        load_model(str(folder), allow_pickle=True, say=None)


def test_a_hub_model_is_identified_by_its_cached_revision(tiny_model_dir, tmp_path, monkeypatch):
    """A hub name is the name and the commit its cached refs/main points to: a new revision is another model."""
    from huggingface_hub import constants

    from preftune.modeling.reference import model_identity

    repo = tmp_path / "hub" / "models--org--tiny"
    for commit in ("a" * 40, "b" * 40):
        shutil.copytree(tiny_model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert json.loads(model_identity("org/tiny")) == {"hub": "org/tiny", "commit": "a" * 40}
    (repo / "refs" / "main").write_text("b" * 40)
    assert json.loads(model_identity("org/tiny"))["commit"] == "b" * 40
    assert model_identity("org/absent") == "org/absent"
