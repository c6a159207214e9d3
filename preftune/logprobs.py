"""Forward paths: a batch of pairs → per-sequence summed log-probs of the answers and their token counts.

Every loss is a function of these statistics only, so all paths below must give the same numbers:

- plain: each prompt+answer as its own right-padded row (what TRL does), full-vocabulary logits.
- prefix-shared (default): the prompt runs once per pair; both answers continue from its KV cache, so
  the prompt's activations (and, in backward, their gradients) are computed once instead of twice.
- chunked projection (default): the decoder's hidden states are gathered at the answer positions only,
  then projected to the vocabulary and log-softmaxed a chunk of tokens at a time under activation
  checkpointing, so `[tokens, vocab]` logits never exist for the whole batch and prompt positions never
  get logits at all.

The exactness of each against the plain path is tested in tests/test_logprobs.py.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from preftune.data.collate import Batch


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


def token_logps(lm, states: torch.Tensor, targets: torch.Tensor, full_logits: bool, chunk_size: int) -> torch.Tensor:
    """log p(target) for N predicting states [N, H] (or logits [N, V]) and targets [N] → [N], fp32."""
    if full_logits:
        return torch.log_softmax(states.float(), dim=-1).gather(-1, targets[:, None]).squeeze(-1)
    head = lm.get_output_embeddings()
    out = []
    for s in range(0, states.shape[0], chunk_size):
        h, t = states[s:s + chunk_size], targets[s:s + chunk_size]
        if torch.is_grad_enabled():
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


def _plain(lm, batch: Batch, full_logits: bool, chunk_size: int) -> torch.Tensor:
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
    logps = token_logps(lm, states[at[:, 0], at[:, 1]], torch.cat(targets), full_logits, chunk_size)
    return torch.zeros(len(rows), device=device, dtype=torch.float32).index_add_(0, torch.cat(seg).to(device), logps)


def _prefix_shared(lm, batch: Batch, full_logits: bool, chunk_size: int) -> torch.Tensor:
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
    logps = token_logps(lm, predictors[sel], ids[sel], full_logits, chunk_size)
    seg = torch.arange(n_sides * b, device=ids.device)[:, None].expand_as(sel)[sel]
    sums = torch.zeros(n_sides * b, device=ids.device, dtype=torch.float32).index_add_(0, seg, logps)
    return sums.view(b, n_sides).t().reshape(-1)  # back to side-major


def forward_logps(model: torch.nn.Module, batch: Batch, *, prefix_sharing: bool = True,
                  chunk_size: int = 1024) -> SequenceLogps:
    """Summed answer log-probs of a batch under `model`.

    Args:
        model: a causal LM, possibly wrapped (PEFT, DDP, accelerate).
        batch: from `collate`; B pairs (or SFT examples when `rejected_ids` is None).
        prefix_sharing: run each prompt once for both answers (exact; off → one row per answer).
        chunk_size: tokens per chunk of the vocabulary projection; 0 → full logits from the model's forward.
    Returns:
        SequenceLogps with [B] tensors (fp32).
    """
    lm = causal_lm(model)
    full_logits = chunk_size <= 0 or not supports_chunked_head(lm)
    # Gradient checkpointing drops the KV cache in training, which the shared-prefix path relies on.
    checkpointing = getattr(lm, "is_activation_checkpointing", None)
    if checkpointing is None:
        checkpointing = lm.is_gradient_checkpointing
    if checkpointing and lm.training and torch.is_grad_enabled():
        prefix_sharing = False
    run = _prefix_shared if prefix_sharing else _plain
    sums = run(lm, batch, full_logits, chunk_size)
    b = len(batch)
    chosen_lengths = batch.chosen_mask.sum(-1).float()
    if batch.rejected_ids is None:
        return SequenceLogps(sums[:b], chosen_lengths)
    return SequenceLogps(sums[:b], chosen_lengths, sums[b:], batch.rejected_mask.sum(-1).float())


class LogpsModel(torch.nn.Module):
    """`forward_logps` as a module, so DDP/FSDP wrap *this* and their forward hooks (gradient sync,
    parameter gathering) run around the whole computation even though it calls the decoder directly."""

    def __init__(self, model: torch.nn.Module, *, prefix_sharing: bool = True, chunk_size: int = 1024):
        super().__init__()
        self.model = model
        self.prefix_sharing, self.chunk_size = prefix_sharing, chunk_size

    def forward(self, batch: Batch) -> SequenceLogps:
        return forward_logps(self.model, batch, prefix_sharing=self.prefix_sharing, chunk_size=self.chunk_size)
