"""Tiny models of the architectures transformers ships that preftune trains, built from their configs with every
dropout rate at 0.5, and a one-sequence reference forward that any of them takes.

The rates are named here by hand, per config (not by the package's own rule for finding them), so a rate the
package misses stays on and shows as noise. Sizes: hidden 32, 2 layers, 4 heads: a forward takes milliseconds.
"""

from __future__ import annotations

import torch

DECODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=256)
# config class name, its keyword arguments (every dropout rate it has at 0.5)
ARCHITECTURES: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", dict(DECODER, attention_dropout=0.5)),
    "mistral": ("MistralConfig", dict(DECODER, attention_dropout=0.5, sliding_window=None)),
    "qwen2": ("Qwen2Config", dict(DECODER, attention_dropout=0.5)),
    "qwen3": ("Qwen3Config", dict(DECODER, head_dim=8, attention_dropout=0.5)),
    "gemma2": ("Gemma2Config", dict(DECODER, head_dim=8, attention_dropout=0.5)),
    "phi3": ("Phi3Config", dict(DECODER, attention_dropout=0.5, resid_pdrop=0.5, embd_pdrop=0.5)),
    "phi": ("PhiConfig", dict(DECODER, attention_dropout=0.5, resid_pdrop=0.5, embd_pdrop=0.5)),
    "opt": ("OPTConfig", dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                              word_embed_proj_dim=32, max_position_embeddings=256, dropout=0.5, attention_dropout=0.5,
                              activation_dropout=0.5, layerdrop=0.5)),
    "gpt_neox": ("GPTNeoXConfig", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       max_position_embeddings=256, attention_dropout=0.5, hidden_dropout=0.5)),
    "falcon": ("FalconConfig", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    attention_dropout=0.5, hidden_dropout=0.5)),
    "gpt2": ("GPT2Config", dict(n_embd=32, n_layer=2, n_head=4, n_positions=256, resid_pdrop=0.5, embd_pdrop=0.5,
                                attn_pdrop=0.5)),
    "mpt": ("MptConfig", dict(d_model=32, n_layers=2, n_heads=4, max_seq_len=256, resid_pdrop=0.5, emb_pdrop=0.5)),
    "bloom": ("BloomConfig", dict(hidden_size=32, n_layer=2, n_head=4, attention_dropout=0.5, hidden_dropout=0.5)),
}
# Models whose attention cannot take the packed layout: ALiBi biases (MPT from column indices; Bloom and Falcon
# from a 2D mask, which they unpack) and a sliding window shorter than the test sequences.
NOT_PACKABLE: dict[str, tuple[str, dict]] = {
    "mpt": ARCHITECTURES["mpt"],
    "bloom": ARCHITECTURES["bloom"],
    "falcon_alibi": ("FalconConfig", dict(ARCHITECTURES["falcon"][1], alibi=True, new_decoder_architecture=False,
                                          multi_query=False, parallel_attn=False, bias=True)),
    "mistral_sliding": ("MistralConfig", dict(DECODER, attention_dropout=0.5, sliding_window=4)),
}


def build(name: str, vocab: int = 64, specials: dict | None = None, spec: tuple[str, dict] | None = None,
          seed: int = 0, to_save: bool = False):
    """The tiny model `name` (of ARCHITECTURES, or `spec`), random weights from `seed`, in training mode.

    MPT declares its attention dropout (attn_config.attn_pdrop) an int, so a config cannot hold 0.5 and a saved
    one would not load; unless `to_save`, it is set on the built config before the model reads it."""
    import transformers

    cls_name, kwargs = spec or ARCHITECTURES[name]
    specials = specials or dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg = getattr(transformers, cls_name)(vocab_size=vocab, **kwargs, **specials)
    if cls_name == "MptConfig" and not to_save:
        vars(cfg.attn_config)["attn_pdrop"] = 0.5
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(cfg).train()


def one_row_logp(model, prompt_ids: list[int], answer_ids: list[int]) -> torch.Tensor:
    """Σ log p(answer token | everything before it): one unpadded row with an all-ones mask (MPT needs one), the
    model's own full logits. No preftune code."""
    ids = torch.tensor([prompt_ids + answer_ids])
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits[0, :-1].double()
    lp = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
    return lp[len(prompt_ids) - 1:].sum()
