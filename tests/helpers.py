"""Shared builders for tests: a tiny tokenizer + Llama model from a config (no downloads) and generated pairs."""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = ("red green blue cat dog bird tree river stone cloud sun moon fast slow big small "
         "one two three four five six seven eight nine ten good bad yes no maybe").split()


def make_pairs(n: int, seed: int = 0) -> list[dict]:
    """Pairs with an easy, prompt-independent preference: chosen answers praise, rejected ones refuse.

    Chosen = "yes good <w> <w>", rejected = "no bad <w> <w>" with the same random words, so the only
    signal is the leading style words; a model can learn it in a few dozen steps.
    """
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        prompt = "question: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) + " answer:"
        tail = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4)))
        pairs.append({"prompt": prompt, "chosen": f" yes good {tail}", "rejected": f" no bad {tail}"})
    return pairs


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def build_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


def build_tiny_model(folder: Path, *, hidden: int = 32, layers: int = 2, seed: int = 0, pad_token: bool = True) -> Path:
    """A 2-layer Llama with a BPE tokenizer trained on the generated pairs, saved with safetensors."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    texts = [p["prompt"] + p["chosen"] + " " + p["rejected"] for p in make_pairs(400, seed=123)]
    tokenizer = build_tokenizer(texts)
    if not pad_token:
        tokenizer.pad_token = None
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder
