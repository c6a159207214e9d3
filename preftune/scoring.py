"""One batched scoring loop: pairs sorted by length → collated → forward → per-pair log-probs, in input order.

The reference precompute, evaluation during training, `preftune inspect --model` and `preftune eval` all
walk pairs this way; writing it once keeps their batching, padding and ordering identical.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

from preftune.data.collate import Batch, collate
from preftune.data.store import padded_lengths
from preftune.data.tokenize import TokenizedPair
from preftune.logprobs import SequenceLogps, forward_logps


def length_sorted_batches(pairs: Sequence[TokenizedPair], batch_size: int, *, pad_id: int,
                          device: torch.device | str = "cpu", rank: int = 0,
                          world: int = 1) -> Iterator[tuple[list[int], Batch]]:
    """(positions, batch) over `pairs`, longest first so each batch pads little; process `rank` of `world`
    takes every world-th pair of that order, so the processes' shares are disjoint and of similar cost."""
    # a stable sort, longest first: the same order as sorted(key=-padded_length), from a lengths array
    order = np.argsort(-padded_lengths(pairs), kind="stable")[rank::world].tolist()
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        yield idx, collate([pairs[i] for i in idx], idx, pad_id).to(device)


@torch.inference_mode()
def score(model: torch.nn.Module, pairs: Sequence[TokenizedPair], *, pad_id: int, batch_size: int,
          prefix_sharing: bool = True, chunk_size: int = 1024,
          autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
          progress: bool = False, desc: str = "scoring") -> SequenceLogps:
    """Summed answer log-probs and token counts of every pair under `model`, in the order of `pairs`.

    Returns SequenceLogps of [N] fp32 CPU tensors (rejected_* None for SFT examples). The model is put in
    eval mode for the pass (dropout off) and restored afterwards.
    """
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    n = len(pairs)
    sides = ("chosen",) if pairs and pairs[0].rejected_ids is None else ("chosen", "rejected")
    cols = {f"{side}_{what}": torch.zeros(n) for side in sides for what in ("logps", "lengths")}
    batches = length_sorted_batches(pairs, batch_size, pad_id=pad_id, device=device)
    with tqdm(total=n, desc=desc, unit="pair", disable=not progress, leave=False) as bar:
        for idx, batch in batches:
            with autocast() if autocast else contextlib.nullcontext():
                out = forward_logps(model, batch, prefix_sharing=prefix_sharing, chunk_size=chunk_size)
            for k, col in cols.items():
                col[idx] = getattr(out, k).float().cpu()
            bar.update(len(idx))
    model.train(was_training)
    return SequenceLogps(**cols)


def score_records(model: torch.nn.Module, tokenizer, records: Sequence[dict], *, max_length: int = 1024,
                  max_prompt_length: int = 512, batch_size: int = 8) -> dict:
    """Summed log-probs of both answers of each preference record (standard or conversational).

    Returns a dict of 1-D fp32 CPU tensors `chosen_logps`, `rejected_logps`, `chosen_lengths`,
    `rejected_lengths` (one entry per kept pair) and `kept`, the record indices they belong to
    (pairs that tokenization drops are left out).
    """
    from preftune.data.render import render_texts
    from preftune.data.tokenize import tokenize_records

    texts = [render_texts(tokenizer, r) for r in records]
    pairs, _ = tokenize_records(tokenizer, texts, max_length=max_length, max_prompt_length=max_prompt_length)
    out = score(model, pairs, pad_id=tokenizer.pad_token_id, batch_size=batch_size)
    result = {k: v for k, v in vars(out).items() if v is not None}
    result["kept"] = [p.index for p in pairs]
    return result


def score_completions(model: torch.nn.Module, tokenizer, prompts: Sequence[str], completions: Sequence[str], *,
                      batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-prob (EOS appended) and token count of each completion given its prompt: ([N], [N]), in order.

    An empty completion scores only its EOS token (the model chose to stop at once), so every sample of a
    model, even an empty one, gets a score; nothing is truncated.
    """
    from preftune.data.tokenize import TokenizedPair, tokenize_texts

    pairs = []
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        prompt_ids, (answer_ids,) = tokenize_texts(tokenizer, prompt, [completion])
        if not answer_ids:
            answer_ids = [tokenizer.eos_token_id]
        pairs.append(TokenizedPair(prompt_ids or [tokenizer.eos_token_id], answer_ids, None, i))
    out = score(model, pairs, pad_id=tokenizer.pad_token_id, batch_size=batch_size)
    return out.chosen_logps, out.chosen_lengths
