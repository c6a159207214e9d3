"""Forward paths: a batch of pairs → per-sequence summed log-probs of the answers and their token counts.

Every loss is a function of these statistics only, so all paths below must give the same numbers:

- plain ("off"): each prompt+answer as its own right-padded row (what TRL does).
- packed ("packed"): each pair as one sequence prompt·chosen·rejected whose rejected answer restarts its
  positions at the prompt's end and is masked off the chosen one (preftune/packing.py). The prompt runs
  once, in one forward, and it composes with activation checkpointing. With a FlexAttention model the
  whole micro-batch is one unpadded row under a block-sparse mask; with sdpa/eager one pair per row under
  a dense 4D mask. Attention backends that cannot take such a mask fall back, said once.
- KV-cache prefix-shared ("cache"): the prompt runs once with a KV cache, then both answers continue from
  it (two forwards; dropped under activation checkpointing, which discards the cache).
- chunked projection (default, with any of the above): the decoder's hidden states are gathered at the
  answer positions only, then projected to the vocabulary and log-softmaxed a chunk of tokens at a time,
  each chunk recomputed in backward unless the micro-batch's logits fit `keep_logits_mib`; prompt
  positions never get logits at all.

preftune/device.py picks among these per device (`plan_forward`).

The exactness of each against the plain path is tested in tests/test_logprobs.py.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from preftune import packing
from preftune.data.collate import Batch

log = logging.getLogger("preftune")
MODES = ("packed", "cache", "off")
# Attention implementations that honour a custom 4D mask / BlockMask passed as attention_mask (transformers'
# masking_utils returns a 4D mask unchanged); flash-attention kernels take only padding masks.
DENSE_MASK_ATTENTION = ("sdpa", "eager")
FLEX_ATTENTION = "flex_attention"
_said: set[str] = set()


def say_once(message: str) -> None:
    if message not in _said:
        _said.add(message)
        log.warning(message)


@dataclass
class SequenceLogps:
    """Summed answer log-probs and answer token counts, shape [B] each (rejected_* None for SFT)."""

    chosen_logps: torch.Tensor
    chosen_lengths: torch.Tensor
    rejected_logps: torch.Tensor | None = None
    rejected_lengths: torch.Tensor | None = None


def causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers *ForCausalLM under DDP/FSDP/accelerate and PEFT wrappers."""
    m = model
    while not hasattr(m, "get_output_embeddings") and hasattr(m, "module"):
        m = m.module
    if hasattr(m, "get_base_model"):  # peft.PeftModel: LoRA layers are injected in place, so the base sees them
        m = m.get_base_model()
    return m


def supports_chunked_head(lm: torch.nn.Module) -> bool:
    """Chunking re-implements `lm_head(hidden)`; models that post-process logits need their own forward."""
    cfg = lm.config
    return (
        lm.get_output_embeddings() is not None
        and not getattr(cfg, "final_logit_softcapping", None)
        and getattr(cfg, "logit_scale", None) in (None, 1, 1.0)
        and hasattr(lm, "get_decoder")
    )


def _cache_kwarg(module: torch.nn.Module) -> str:
    # transformers 5.x renamed `past_key_values` to `cache`; older releases only know the first.
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def _states(lm, full_logits: bool, keep_last_only: bool = False, cache=None, **kwargs):
    """Decoder output states at every position: logits when full_logits, else final hidden states."""
    module = lm if full_logits else lm.get_decoder()
    if cache is not None:
        kwargs[_cache_kwarg(module)] = cache
    out = module(**kwargs, logits_to_keep=1 if keep_last_only else 0) if full_logits else module(**kwargs)
    # Read the field this transformers version has; touching the deprecated alias would warn.
    new_cache = out.cache if hasattr(out, "cache") else getattr(out, "past_key_values", None)
    return (out.logits if full_logits else out.last_hidden_state), new_cache


def _head_logps(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def token_logps(lm, states: torch.Tensor, targets: torch.Tensor, full_logits: bool, chunk_size: int,
                keep_logits_mib: float = 0) -> torch.Tensor:
    """log p(target) for N predicting states [N, H] (or logits [N, V]) and targets [N] → [N], fp32.

    In training each chunk's logits are recomputed in backward unless all N tokens' fp32 logits fit in
    `keep_logits_mib` (CPU: RAM is cheap and the recompute is 1/4 of the head's work; GPU: 0, always recompute).
    """
    if full_logits:
        return torch.log_softmax(states.float(), dim=-1).gather(-1, targets[:, None]).squeeze(-1)
    head = lm.get_output_embeddings()
    recompute = states.shape[0] * head.weight.shape[0] * 4 > keep_logits_mib * 2**20
    out = []
    for s in range(0, states.shape[0], chunk_size):
        h, t = states[s:s + chunk_size], targets[s:s + chunk_size]
        if torch.is_grad_enabled() and recompute:
            # Recompute this chunk's logits in backward instead of keeping [chunk, vocab] alive.
            out.append(checkpoint(_head_logps, head, h, t, use_reentrant=False))
        else:
            out.append(_head_logps(head, h, t))
    return torch.cat(out) if out else states.new_zeros(0, dtype=torch.float32)


def _answers(batch: Batch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    sides = [(batch.chosen_ids, batch.chosen_mask)]
    if batch.rejected_ids is not None:
        sides.append((batch.rejected_ids, batch.rejected_mask))
    return sides


def _plain(lm, batch: Batch, full_logits: bool, chunk_size: int, keep_mib: float = 0) -> torch.Tensor:
    """Each prompt+answer its own right-padded row. Returns sums [S*B] ordered side-major (c0..cB, r0..rB)."""
    prompt_lens = batch.prompt_mask.sum(-1).tolist()
    rows, predict_at, targets, seg = [], [], [], []
    tp = batch.prompt_ids.shape[1]
    for ids, mask in _answers(batch):
        lens = mask.sum(-1).tolist()
        for i, (lp, la) in enumerate(zip(prompt_lens, lens)):
            r = len(rows)
            rows.append(torch.cat([batch.prompt_ids[i, tp - lp:], ids[i, :la]]))
            predict_at.append(torch.stack([torch.full((la,), r), torch.arange(lp - 1, lp + la - 1)], 1))
            targets.append(ids[i, :la])
            seg.append(torch.full((la,), r))
    width = max(len(r) for r in rows)
    device = batch.prompt_ids.device
    input_ids = torch.zeros(len(rows), width, dtype=torch.long, device=device)
    attn = torch.zeros_like(input_ids)
    for r, row in enumerate(rows):
        input_ids[r, :len(row)] = row
        attn[r, :len(row)] = 1
    states, _ = _states(lm, full_logits, input_ids=input_ids, attention_mask=attn, use_cache=False)
    at = torch.cat(predict_at).to(device)
    logps = token_logps(lm, states[at[:, 0], at[:, 1]], torch.cat(targets), full_logits, chunk_size, keep_mib)
    return torch.zeros(len(rows), device=device, dtype=torch.float32).index_add_(0, torch.cat(seg).to(device), logps)


def _prefix_shared(lm, batch: Batch, full_logits: bool, chunk_size: int, keep_mib: float = 0) -> torch.Tensor:
    """Prompt once with a KV cache, then every answer against it. Returns sums [S*B] side-major."""
    sides = _answers(batch)
    n_sides, b = len(sides), len(batch)
    pmask = batch.prompt_mask
    ppos = (pmask.cumsum(-1) - 1).clamp(min=0)
    pstates, cache = _states(lm, full_logits, keep_last_only=True, input_ids=batch.prompt_ids, attention_mask=pmask,
                             position_ids=ppos, use_cache=True)
    last = pstates[:, -1]  # left padding puts every prompt's last token in the last column
    width = max(ids.shape[1] for ids, _ in sides)
    # Interleave rows (c0, r0, c1, r1, ...) so the cache can be repeated with repeat_interleave.
    ids = torch.stack([F.pad(i, (0, width - i.shape[1])) for i, _ in sides], 1).reshape(n_sides * b, width)
    amask = torch.stack([F.pad(m, (0, width - m.shape[1])) for _, m in sides], 1).reshape(n_sides * b, width)
    if n_sides > 1:
        cache.batch_repeat_interleave(n_sides)
    attn = torch.cat([pmask.repeat_interleave(n_sides, 0), amask], 1)
    pos = pmask.sum(-1).repeat_interleave(n_sides, 0)[:, None] + torch.arange(width, device=ids.device)
    astates, _ = _states(lm, full_logits, input_ids=ids, attention_mask=attn, position_ids=pos,
                         cache=cache, use_cache=True)
    # The state predicting answer token j is the prompt's last state for j = 0, else answer state j-1.
    predictors = torch.cat([last.repeat_interleave(n_sides, 0)[:, None], astates[:, :-1]], 1)
    sel = amask.bool()
    logps = token_logps(lm, predictors[sel], ids[sel], full_logits, chunk_size, keep_mib)
    seg = torch.arange(n_sides * b, device=ids.device)[:, None].expand_as(sel)[sel]
    sums = torch.zeros(n_sides * b, device=ids.device, dtype=torch.float32).index_add_(0, seg, logps)
    return sums.view(b, n_sides).t().reshape(-1)  # back to side-major


def _packed(lm, batch: Batch, full_logits: bool, chunk_size: int, keep_mib: float = 0,
            rows: str | None = None) -> torch.Tensor:
    """prompt·chosen·rejected as one sequence per pair. Returns sums [S*B] side-major."""
    impl = attention_implementation(lm)
    flex = impl == FLEX_ATTENTION
    rows = rows or ("packed" if flex else "pair")
    # 128 = FlexAttention's block size: the compiled kernel then sees few distinct row lengths.
    p = packing.pack(batch, rows=rows, pad_to=128 if rows == "packed" and flex else 1)
    if flex:
        mask = packing.block_mask(p, compile_mask=p.input_ids.is_cuda)
    else:
        # sdpa takes a bool mask in any dtype; eager adds the mask to its scores.
        mask = packing.dense_mask(p, None if impl == "sdpa" else torch.float32)
    states, _ = _states(lm, full_logits, input_ids=p.input_ids, attention_mask=mask, position_ids=p.position_ids,
                        use_cache=False)
    flat = states.reshape(-1, states.shape[-1])
    logps = token_logps(lm, flat[p.predict], p.targets, full_logits, chunk_size, keep_mib)
    return torch.zeros(p.num_sequences, device=flat.device, dtype=torch.float32).index_add_(0, p.seq, logps)


def attention_implementation(lm: torch.nn.Module) -> str | None:
    impl = getattr(lm.config, "_attn_implementation", None)
    return impl if isinstance(impl, str) else None


def packed_unsupported(lm: torch.nn.Module) -> str | None:
    """Why this model cannot run the packed layout exactly (None = it can)."""
    impl = attention_implementation(lm)
    if impl not in (*DENSE_MASK_ATTENTION, FLEX_ATTENTION):
        return f"its attention implementation {impl!r} takes no custom mask"
    cfg = lm.config
    # A sliding window counts distances in the packed row, where a rejected token sits c tokens further from
    # its prompt than in its own sequence; our mask would replace the window rather than add to it.
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True) is not False:
        return "it uses sliding-window attention"
    if any("sliding" in str(t) or "chunked" in str(t) for t in (getattr(cfg, "layer_types", None) or ())):
        return "some of its layers use sliding-window or chunked attention"
    return None


def resolve_mode(lm: torch.nn.Module, prefix_sharing: bool | str, training: bool) -> str:
    """The path that will run: 'packed', 'cache' or 'off'. True/'auto' = packed where the model takes the
    mask, else the KV cache; activation checkpointing in training rules the KV cache out (it drops the cache)."""
    mode = {True: "auto", False: "off"}.get(prefix_sharing, prefix_sharing)
    if mode not in (*MODES, "auto"):
        raise ValueError(f"prefix_sharing must be auto, packed, cache, off or a bool, got {prefix_sharing!r}")
    if mode in ("auto", "packed"):
        why = packed_unsupported(lm)
        if why is None:
            return "packed"
        if mode == "packed":
            say_once(f"packed prefix sharing is off for this model: {why}; using the KV-cache path instead")
        mode = "cache"
    if mode == "cache" and training and is_checkpointing(lm):
        say_once("the KV-cache prefix sharing cannot run under activation checkpointing (it drops the cache); "
                 "using one row per answer")
        mode = "off"
    return mode


def is_checkpointing(lm: torch.nn.Module) -> bool:
    checkpointing = getattr(lm, "is_activation_checkpointing", None)
    if checkpointing is None:
        checkpointing = getattr(lm, "is_gradient_checkpointing", False)
    return bool(checkpointing)


def forward_logps(model: torch.nn.Module, batch: Batch, *, prefix_sharing: bool | str = "auto",
                  chunk_size: int = 1024, keep_logits_mib: float = 0, rows: str | None = None) -> SequenceLogps:
    """Summed answer log-probs of a batch under `model`.

    Args:
        model: a causal LM, possibly wrapped (PEFT, DDP, accelerate).
        batch: from `collate`; B pairs (or SFT examples when `rejected_ids` is None).
        prefix_sharing: how each prompt is shared by its answers (all exact): "packed", "cache", "off" (one
            row per answer), or "auto"/True (packed where the model's attention takes the mask, else cache).
        chunk_size: tokens per chunk of the vocabulary projection; 0 → full logits from the model's forward.
        keep_logits_mib: in training, keep the head's logits for backward instead of recomputing them when the
            micro-batch's fp32 logits fit in this many MiB (0 = always recompute).
        rows: packed layout only: "pair" (one pair per row) or "packed" (one row); default from the
            attention implementation (FlexAttention → "packed").
    Returns:
        SequenceLogps with [B] tensors (fp32).
    """
    lm = causal_lm(model)
    full_logits = chunk_size <= 0 or not supports_chunked_head(lm)
    mode = resolve_mode(lm, prefix_sharing, lm.training and torch.is_grad_enabled())
    if mode == "packed":
        sums = _packed(lm, batch, full_logits, chunk_size, keep_logits_mib, rows)
    else:
        sums = (_prefix_shared if mode == "cache" else _plain)(lm, batch, full_logits, chunk_size, keep_logits_mib)
    b = len(batch)
    chosen_lengths = batch.chosen_mask.sum(-1).float()
    if batch.rejected_ids is None:
        return SequenceLogps(sums[:b], chosen_lengths)
    return SequenceLogps(sums[:b], chosen_lengths, sums[b:], batch.rejected_mask.sum(-1).float())


class LogpsModel(torch.nn.Module):
    """`forward_logps` as a module, so DDP/FSDP wrap *this* and their forward hooks (gradient sync,
    parameter gathering) run around the whole computation even though it calls the decoder directly."""

    def __init__(self, model: torch.nn.Module, *, prefix_sharing: bool | str = "auto", chunk_size: int = 1024,
                 keep_logits_mib: float = 0, rows: str | None = None):
        super().__init__()
        self.model = model
        self.options = dict(prefix_sharing=prefix_sharing, chunk_size=chunk_size, keep_logits_mib=keep_logits_mib,
                            rows=rows)

    def forward(self, batch: Batch) -> SequenceLogps:
        return forward_logps(self.model, batch, **self.options)
