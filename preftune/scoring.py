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
    takes every world-th pair of that order, so the processes' shares are disjoint and of similar cost.

    With several processes every one yields the same number of batches: a process whose share needs fewer
    ends with filler batches, yielded with *no* positions (`([], batch)`), which the caller runs and ignores.
    Under FSDP2 and ZeRO-3 each forward is a collective (the layers' weights are gathered from all
    processes), so a process that skipped one would leave the others waiting forever.
    """
    # a stable sort, longest first: the same order as sorted(key=-padded_length), from a lengths array
    order = np.argsort(-padded_lengths(pairs), kind="stable").tolist()
    mine = order[rank::world]
    for s in range(0, len(mine), batch_size):
        idx = mine[s:s + batch_size]
        yield idx, collate([pairs[i] for i in idx], idx, pad_id).to(device)
    if world > 1 and order:
        most = -(-len(order[0::world]) // batch_size)  # rank 0's share is the longest
        for _ in range(most - -(-len(mine) // batch_size)):
            yield [], collate([pairs[order[0]]], [order[0]], pad_id).to(device)


@torch.no_grad()  # not inference_mode: FSDP2 would build its unsharded parameters as inference tensors
def score(model: torch.nn.Module, pairs: Sequence[TokenizedPair], *, pad_id: int, batch_size: int,
          prefix_sharing: bool | str = "auto", chunk_size: int = 1024,
          autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
          progress: bool = False, desc: str = "scoring", rank: int = 0, world: int = 1,
          runner: Callable[[Batch], SequenceLogps] | None = None,
          device: torch.device | None = None) -> SequenceLogps:
    """Summed answer log-probs and token counts of every pair under `model`, in the order of `pairs`.

    Returns SequenceLogps of [N] fp32 CPU tensors (rejected_* None for SFT examples). The model is put in
    eval mode for the pass (dropout off) and restored afterwards.

    Several processes (`rank` of `world`, torch.distributed initialised) split the pairs, each scoring its
    share once, and the shares are summed across processes: every pair is scored by exactly one process and
    is 0 elsewhere, so the sum is exact. `runner` is the model as the launch wrapped it (a LogpsModel under
    FSDP2/DeepSpeed, whose forward gathers the shards), called instead of `forward_logps(model, ...)`;
    `device` is where batches go (default: the model's first parameter's).
    """
    from tqdm.auto import tqdm

    module = runner if isinstance(runner, torch.nn.Module) else model
    was_training = module.training
    module.eval()
    device = device or next(model.parameters()).device
    n = len(pairs)
    sides = ("chosen",) if pairs and pairs[0].rejected_ids is None else ("chosen", "rejected")
    cols = {f"{side}_{what}": torch.zeros(n) for side in sides for what in ("logps", "lengths")}
    batches = length_sorted_batches(pairs, batch_size, pad_id=pad_id, device=device, rank=rank, world=world)
    with tqdm(total=n, desc=desc, unit="pair", disable=not progress, leave=False) as bar:
        for idx, batch in batches:
            with autocast() if autocast else contextlib.nullcontext():
                if runner is not None:
                    out = runner(batch)
                else:
                    out = forward_logps(model, batch, prefix_sharing=prefix_sharing, chunk_size=chunk_size)
            if not idx:  # a filler batch (see length_sorted_batches)
                continue
            for k, col in cols.items():
                col[idx] = getattr(out, k).float().cpu()
            bar.update(len(idx) * world)
    module.train(was_training)
    if world > 1:
        import torch.distributed as dist

        stacked = torch.stack(list(cols.values())).to(device)
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
        cols = dict(zip(cols, stacked.cpu()))
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


def score_ids(model: torch.nn.Module, prompt_ids: Sequence[list[int]], completion_ids: Sequence[list[int]], *,
              pad_id: int, batch_size: int = 16,
              autocast: Callable[[], contextlib.AbstractContextManager] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-prob and token count of each completion, given as token ids, after its prompt ids.

    For a model's own samples this scores exactly the tokens it drew (decoding to text and tokenizing again
    can give other tokens). Returns ([N], [N]) fp32 CPU tensors in input order; completions must be non-empty.
    """
    from preftune.data.tokenize import TokenizedPair

    pairs = [TokenizedPair(list(p), list(c), None, i) for i, (p, c) in enumerate(zip(prompt_ids, completion_ids))]
    out = score(model, pairs, pad_id=pad_id, batch_size=batch_size, autocast=autocast)
    return out.chosen_logps, out.chosen_lengths
