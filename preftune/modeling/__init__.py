"""Model side: load model + tokenizer, LoRA, reference strategies."""

from preftune.modeling.load import (
    add_lora,
    disable_dropout,
    load_model,
    load_model_and_tokenizer,
    load_tokenizer,
)

__all__ = ["add_lora", "disable_dropout", "load_model", "load_model_and_tokenizer", "load_tokenizer"]
