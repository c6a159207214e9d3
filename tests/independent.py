"""Second implementations for tests, written differently from the package so an expected value never comes
from the code under test: token ids from the Hugging Face tokenizer alone, log-probs from one unpadded row
and the model's own full logits, no batching, no KV cache, no chunking, no preftune import."""

from __future__ import annotations

import torch


def hand_ids(tok, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids + EOS) by encoding prompt and prompt+answer with the tokenizer itself.

    Valid only when the prompt's encoding is a prefix of the joint one (no BPE merge across the boundary),
    which is asserted: the tests' prompts end in ':' and answers start with a space, a pre-tokenizer split.
    """
    p = tok(prompt)["input_ids"]
    full = tok(prompt + answer)["input_ids"]
    assert full[:len(p)] == p, (prompt, answer)
    return p, full[len(p):] + [tok.eos_token_id]


def row_logp(model, prompt_ids: list[int], answer_ids: list[int]) -> torch.Tensor:
    """Σ log p(answer token | everything before it), one unpadded row, full logits (keeps the graph)."""
    ids = torch.tensor([prompt_ids + answer_ids])
    logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
    lp = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
    return lp[len(prompt_ids) - 1:].sum()
