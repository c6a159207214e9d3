"""One batched scoring loop: pairs sorted by length → collated → forward → per-pair log-probs, in input order.

The reference precompute, evaluation during training, `preftune inspect --model` and `preftune eval` all
walk pairs this way; writing it once keeps their batching, padding and ordering identical. The forward is a
handle (`logprobs.LogpsModel`: a model and its ForwardPlan), run in eval mode without gradients:

    from preftune.device import forward_handle
    handle = forward_handle(model)          # the plan is decided here, once (device.plan_forward)
    out = score(handle, pairs, pad_id=tok.pad_token_id, batch_size=8)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from preftune.data.batching import length_sorted_share
from preftune.data.collate import Batch, collate
from preftune.data.encode import tokenize_records
from preftune.data.render import render_texts
from preftune.data.tokenize import TokenizedPair
from preftune.device import forward_handle
from preftune.logprobs import SequenceLogps, inference


def length_sorted_batches(pairs: Sequence[TokenizedPair], batch_size: int, *, pad_id: int,
                          device: torch.device | str = "cpu", rank: int = 0,
                          world: int = 1) -> Iterator[tuple[list[int], bool, Batch]]:
    """(positions, is_filler, batch) of process `rank`'s share of `pairs` (`batching.length_sorted_share`:
    longest first, every world-th pair), collated on `device`. With several processes every one yields the same
    number of batches, its filler batches last: the caller runs them and ignores their outputs (the filler
    convention, preftune/data/batching.py)."""
    for idx, filler in length_sorted_share(pairs, batch_size, rank=rank, world=world).runs():
        yield idx, filler, collate([pairs[i] for i in idx], idx, pad_id).to(device)


def score(handle: torch.nn.Module, pairs: Sequence[TokenizedPair], *, pad_id: int, batch_size: int,
          autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
          progress: bool = False, desc: str = "scoring", rank: int = 0, world: int = 1,
          device: torch.device | None = None) -> SequenceLogps:
    """Summed answer log-probs and token counts of every pair under `handle`, in the order of `pairs`.

    `handle`: a LogpsModel (`device.forward_handle(model)`), or the one the launch wrapped (under FSDP2/DeepSpeed
    its forward gathers the shards). It runs in eval mode (dropout off) without gradients, whatever mode it was
    in, and every submodule's mode is restored afterwards. Returns SequenceLogps of [N] CPU tensors (fp32, float64
    for a float64 model; rejected_* None for SFT examples; the statistics its plan asks for filled in too).

    Several processes (`rank` of `world`, torch.distributed initialised) split the pairs, each scoring its
    share once, and the shares are summed across processes: every pair is scored by exactly one process and
    is 0 elsewhere, so the sum is exact. `device` is where batches go (default: the handle's first parameter's).
    """
    device = device or next(handle.parameters()).device
    n = len(pairs)
    sides = ("chosen",) if pairs and pairs[0].rejected_ids is None else ("chosen", "rejected")
    cols: dict[str, torch.Tensor] = {}
    batches = length_sorted_batches(pairs, batch_size, pad_id=pad_id, device=device, rank=rank, world=world)
    with tqdm(total=n, desc=desc, unit="pair", disable=not progress, leave=False) as bar, inference(handle):
        for idx, filler, batch in batches:
            with autocast() if autocast else contextlib.nullcontext():
                out = handle(batch)
            if not cols:  # the log-probs' own precision (float64 stays float64); the plan's statistics too
                cols = {k: torch.zeros(n, dtype=None if k.endswith("lengths") else out.chosen_logps.dtype)
                        for k, v in vars(out).items() if v is not None and k != "desirable"}
            if filler:
                continue
            for k, col in cols.items():
                col[idx] = getattr(out, k).to(col.dtype).cpu()
            bar.update(len(idx) * world)
    cols = cols or {f"{side}_{what}": torch.zeros(n) for side in sides for what in ("logps", "lengths")}
    if world > 1:
        stacked = torch.stack([c.double() for c in cols.values()]).to(device)
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
        cols = {k: v.to(c.dtype) for (k, c), v in zip(cols.items(), stacked.cpu())}
    return SequenceLogps(**cols)


def score_records(model: torch.nn.Module, tokenizer, records: Sequence[dict], *, max_length: int = 1024,
                  max_prompt_length: int = 512, batch_size: int = 8) -> dict:
    """Summed log-probs of both answers of each preference record (standard or conversational).

    `model`: a handle (`device.forward_handle`), or a loaded model, whose forward plan is then decided here.

    Returns a dict of 1-D fp32 CPU tensors `chosen_logps`, `rejected_logps`, `chosen_lengths`,
    `rejected_lengths` (one entry per kept pair) and `kept`, the record indices they belong to
    (pairs that tokenization drops are left out).
    """
    texts = [render_texts(tokenizer, r) for r in records]
    pairs, _ = tokenize_records(tokenizer, texts, max_length=max_length, max_prompt_length=max_prompt_length)
    out = score(forward_handle(model), pairs, pad_id=tokenizer.pad_token_id, batch_size=batch_size)
    result = {k: v for k, v in vars(out).items() if v is not None}
    result["kept"] = [p.index for p in pairs]
    return result


def score_ids(model: torch.nn.Module, prompt_ids: Sequence[list[int]], completion_ids: Sequence[list[int]], *,
              pad_id: int, batch_size: int = 16,
              autocast: Callable[[], contextlib.AbstractContextManager] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-prob and token count of each completion, given as token ids, after its prompt ids.

    For a model's own samples this scores exactly the tokens it drew (decoding to text and tokenizing again
    can give other tokens). `model`: a handle or a loaded model (planned here). Returns ([N], [N]) fp32 CPU tensors in input order; completions must be non-empty.
    """
    pairs = [TokenizedPair(list(p), list(c), None, i) for i, (p, c) in enumerate(zip(prompt_ids, completion_ids))]
    out = score(forward_handle(model), pairs, pad_id=pad_id, batch_size=batch_size, autocast=autocast)
    return out.chosen_logps, out.chosen_lengths
