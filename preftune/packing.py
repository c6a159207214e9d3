"""Packed prefix sharing: each pair as ONE sequence prompt·chosen·rejected (Wang & Hegde 2024, "Accelerating
Direct Preference Optimization with Prefix Sharing", arXiv 2410.20305).

Layout of one pair with prompt P (p tokens), chosen C (c) and rejected R (r):

    tokens     P0 .. Pp-1 | C0 .. Cc-1     | R0 .. Rr-1
    positions  0  .. p-1  | p  .. p+c-1    | p  .. p+r-1      (the rejected answer restarts at the prompt's end)
    sees       causal     | P, C causally  | P, R causally, never C

so every rejected token's attention and rotary positions are exactly those of the row prompt·rejected, and
the prompt runs once. SFT examples (no rejected answer) are prompt·chosen with a plain causal mask.

Two row layouts, same per-pair layout:
- `"pair"`: one pair per row, rows right-padded to the longest pair ([B, L]); a dense mask [B, 1, L, L]
  costs L² per pair, like the pair's own attention. What sdpa/eager (CPU, tests) run.
- `"packed"`: all pairs of the micro-batch in one row with no padding between them (plus a tail padded
  to a multiple of `pad_to`, so a compiled kernel sees few distinct lengths); a document mask keeps pairs
  apart. As a FlexAttention `BlockMask` (GPU) only the blocks near the diagonal are computed; as a
  dense mask (tests) it costs S² for the whole row.

The state predicting answer token t is at the column before it; for rejected token 0 that is the
prompt's last token, shared with chosen token 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PROMPT, CHOSEN, REJECTED, PAD = 0, 1, 2, -1


@dataclass
class Packed:
    """Model inputs for the packed layout and where to read each answer token's log-prob.

    input_ids, position_ids, kind, doc: [R, L]. kind is PROMPT/CHOSEN/REJECTED/PAD per token; doc is the
    pair's index within the batch (PAD tokens: -1). predict: [N] flat indices into the [R*L] states of the
    state predicting each answer token; targets: [N] those tokens; seq: [N] which sequence each belongs to,
    side-major (chosen of pairs 0..B-1, then rejected of pairs 0..B-1).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    kind: torch.Tensor
    doc: torch.Tensor
    predict: torch.Tensor
    targets: torch.Tensor
    seq: torch.Tensor
    num_sequences: int


def pack(batch, rows: str = "pair", pad_to: int = 1) -> Packed:
    """Lay a collated Batch (prompts left-padded, answers right-padded) out as packed sequences.

    rows: "pair" (one pair per row) or "packed" (the whole batch in one row). All on the batch's device,
    with one host sync (the row length).
    """
    if rows not in ("pair", "packed"):
        raise ValueError(f"rows must be 'pair' or 'packed', got {rows!r}")
    c_ids, c_mask, r_ids, r_mask = batch.chosen_ids, batch.chosen_mask, batch.rejected_ids, batch.rejected_mask
    dev = c_ids.device
    b, tp = batch.prompt_ids.shape
    lp = batch.prompt_mask.sum(-1)
    lc = c_mask.sum(-1)
    lr = r_mask.sum(-1) if r_mask is not None else torch.zeros_like(lc)
    total = lp + lc + lr
    # The only host sync of the layout (a GPU waits for nothing else here).
    width, n, shortest_prompt = torch.stack([total.max(), total.sum(), lp.min()]).tolist()
    if shortest_prompt == 0:
        raise ValueError("packed prefix sharing needs a non-empty prompt for every pair")
    j = torch.arange(width, device=dev)[None, :]
    lp_, lc_, tot_ = lp[:, None], lc[:, None], total[:, None]
    in_p, in_c = j < lp_, (j >= lp_) & (j < lp_ + lc_)
    in_r = (j >= lp_ + lc_) & (j < tot_)
    ids = batch.prompt_ids.gather(1, (tp - lp_ + j).clamp(0, tp - 1))
    ids = torch.where(in_c, c_ids.gather(1, (j - lp_).clamp(0, c_ids.shape[1] - 1)), ids)
    if r_ids is not None:
        ids = torch.where(in_r, r_ids.gather(1, (j - lp_ - lc_).clamp(0, r_ids.shape[1] - 1)), ids)
    real = in_p | in_c | in_r
    ids = torch.where(real, ids, torch.zeros_like(ids))
    kind = torch.full_like(ids, PAD)
    kind[in_p], kind[in_c], kind[in_r] = PROMPT, CHOSEN, REJECTED
    pos = torch.where(in_r, j - lc_, j).expand(b, width)
    doc = torch.where(real, torch.arange(b, device=dev)[:, None], torch.full_like(ids, -1))

    # Column of the state predicting each answer token; side-major sequence ids.
    tc = torch.arange(c_ids.shape[1], device=dev)[None, :]
    cols = [(lp_ - 1 + tc)[c_mask.bool()]]
    rows_of = [torch.arange(b, device=dev)[:, None].expand_as(c_mask)[c_mask.bool()]]
    targets = [c_ids[c_mask.bool()]]
    seq = [rows_of[0]]
    if r_ids is not None:
        tr = torch.arange(r_ids.shape[1], device=dev)[None, :]
        rcol = torch.where(tr == 0, lp_ - 1, lp_ + lc_ + tr - 1)
        rsel = r_mask.bool()
        cols.append(rcol[rsel])
        rows_of.append(torch.arange(b, device=dev)[:, None].expand_as(r_mask)[rsel])
        targets.append(r_ids[rsel])
        seq.append(rows_of[-1] + b)
    col, row = torch.cat(cols), torch.cat(rows_of)
    n_seq = b * (2 if r_ids is not None else 1)

    if rows == "pair":
        return Packed(ids, pos.contiguous(), kind, doc, row * width + col, torch.cat(targets), torch.cat(seq), n_seq)

    # One row: real tokens in row-major order; pair i starts at the sum of the lengths before it.
    starts = total.cumsum(0) - total
    length = -(-n // pad_to) * pad_to
    pad = length - n

    def flat(t: torch.Tensor, fill: int) -> torch.Tensor:
        return torch.cat([t[real], t.new_full((pad,), fill)])[None, :]

    return Packed(flat(ids, 0), flat(pos, 0), flat(kind, PAD), flat(doc, -1), starts[row] + col,
                  torch.cat(targets), torch.cat(seq), n_seq)


def allowed(kind_q: torch.Tensor, kind_k: torch.Tensor, doc_q: torch.Tensor, doc_k: torch.Tensor,
            q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
    """The attention rule, shared by the dense mask and the FlexAttention mask_mod: same pair (padding
    counts as one document, so padded queries attend to something and stay finite), causal, and a
    rejected query never sees a chosen key."""
    return (doc_q == doc_k) & (kv_idx <= q_idx) & ~((kind_q == REJECTED) & (kind_k == CHOSEN))


def dense_mask(p: Packed, additive_dtype: torch.dtype | None = None) -> torch.Tensor:
    """[R, 1, L, L] mask: bool (True = attend) for sdpa, or additive (0 / dtype's min) for eager."""
    idx = torch.arange(p.kind.shape[1], device=p.kind.device)
    ok = allowed(p.kind[:, :, None], p.kind[:, None, :], p.doc[:, :, None], p.doc[:, None, :],
                 idx[:, None], idx[None, :])[:, None]
    if additive_dtype is None:
        return ok
    return torch.zeros(ok.shape, dtype=additive_dtype, device=ok.device).masked_fill_(
        ~ok, torch.finfo(additive_dtype).min)


def block_mask(p: Packed, compile_mask: bool = False):
    """The same rule as a FlexAttention BlockMask (block-sparse: blocks outside every pair are skipped)."""
    import inspect

    from torch.nn.attention.flex_attention import create_block_mask

    kind, doc = p.kind, p.doc

    def mask_mod(b, h, q_idx, kv_idx):
        return allowed(kind[b, q_idx], kind[b, kv_idx], doc[b, q_idx], doc[b, kv_idx], q_idx, kv_idx)

    rows, length = kind.shape
    extra = {"_compile": compile_mask} if "_compile" in inspect.signature(create_block_mask).parameters else {}
    return create_block_mask(mask_mod, B=rows, H=None, Q_LEN=length, KV_LEN=length, device=kind.device, **extra)
