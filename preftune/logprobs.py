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

Which of them a model runs is decided once, by preftune/device.py's `plan_forward` (it probes the model), and
held in a `ForwardPlan`; a `LogpsModel` (the handle: batch → log-probs) runs exactly that plan, nothing here
decides again. Training, the reference pass, evaluation and every scoring command call a handle; `inference`
is how they score: eval mode (no dropout) and no gradients, the caller's modes put back afterwards.

The exactness of each against the plain path is tested in tests/test_logprobs.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from preftune import packing
from preftune.data.collate import Batch
from preftune.modeling.load import disable_dropout

log = logging.getLogger("preftune")
PATHS = ("packed", "cache", "off")
# Attention implementations that honour a custom 4D mask / BlockMask passed as attention_mask (transformers'
# masking_utils returns a 4D mask unchanged); flash-attention kernels take only padding masks.
DENSE_MASK_ATTENTION = ("sdpa", "eager")
FLEX_ATTENTION = "flex_attention"
_said: set[str] = set()


def say_once(message: str) -> None:
    if message not in _said:
        _said.add(message)
        log.warning(message)


STATISTICS = ("shared", "aligned")
"""Per-sequence statistics a plan computes beyond the summed log-probs, only when it asks (ForwardPlan.statistics):
"shared" (LD-DPO): the log-prob of each answer's first ℓ = min(|c|, |r|) tokens, ℓ its pair's shorter answer;
"aligned" (WPO): Σ_t log p(y_t) − log Σ_v p(v)² over the answer, without gradient."""


@dataclass
class SequenceLogps:
    """Summed answer log-probs and answer token counts, shape [B] each (rejected_* None for SFT); log-probs in
    fp32, or float64 for a float64 model. The `*_shared_logps` and `*_aligned_logps` are [B] when the plan asks
    for them (see STATISTICS), else None. `desirable`: unpaired examples' labels [B] bool, carried from the batch
    (`Batch.desirable`) so that an objective sees them beside the log-probs; None for pairs and SFT."""

    chosen_logps: torch.Tensor
    chosen_lengths: torch.Tensor
    rejected_logps: torch.Tensor | None = None
    rejected_lengths: torch.Tensor | None = None
    chosen_shared_logps: torch.Tensor | None = None
    rejected_shared_logps: torch.Tensor | None = None
    chosen_aligned_logps: torch.Tensor | None = None
    rejected_aligned_logps: torch.Tensor | None = None
    desirable: torch.Tensor | None = None


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


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    # Half precision is widened for the log-softmax; float64 stays float64 (fp32 would round it away).
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _head_logps(head: torch.nn.Module | None, states: torch.Tensor, targets: torch.Tensor,
                collision: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log p(target) from hidden states through `head` (None: `states` are logits already); with `collision`
    also log Σ_v p(v)² per token (WPO's statistic) = logsumexp(2·logits) − 2·logsumexp(logits), without
    gradient: one more logsumexp over the vocabulary, no probabilities materialised."""
    logits = _at_least_fp32(head(states) if head is not None else states)
    if head is None and not collision:
        return torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)
    lse = torch.logsumexp(logits, dim=-1)
    logps = logits.gather(-1, targets[:, None]).squeeze(-1) - lse
    if not collision:
        return logps
    with torch.no_grad():
        return logps, torch.logsumexp(2.0 * logits, dim=-1) - 2.0 * lse


def token_logps(lm, states: torch.Tensor, targets: torch.Tensor, full_logits: bool, chunk_size: int,
                keep_logits_mib: float = 0, collision: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log p(target) for N predicting states [N, H] (or logits [N, V]) and targets [N] → [N], fp32 (float64
    for float64 states); with `collision`, (that, log Σ_v p(v)² [N] without gradient).

    In training each chunk's logits are recomputed in backward unless all N tokens' fp32 logits fit in
    `keep_logits_mib` (CPU: RAM is cheap and the recompute is 1/4 of the head's work; GPU: 0, always recompute).
    """
    if full_logits:
        return _head_logps(None, states, targets, collision)
    head = lm.get_output_embeddings()
    recompute = states.shape[0] * head.weight.shape[0] * 4 > keep_logits_mib * 2**20
    out = []
    for s in range(0, states.shape[0], chunk_size):
        h, t = states[s:s + chunk_size], targets[s:s + chunk_size]
        if torch.is_grad_enabled() and recompute:
            # Recompute this chunk's logits in backward instead of keeping [chunk, vocab] alive.
            out.append(checkpoint(_head_logps, head, h, t, collision, use_reentrant=False))
        else:
            out.append(_head_logps(head, h, t, collision))
    if not out:
        empty = _at_least_fp32(states.new_zeros(0))
        return (empty, empty) if collision else empty
    if collision:
        return torch.cat([o[0] for o in out]), torch.cat([o[1] for o in out])
    return torch.cat(out)


def _answers(batch: Batch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    sides = [(batch.chosen_ids, batch.chosen_mask)]
    if batch.rejected_ids is not None:
        sides.append((batch.rejected_ids, batch.rejected_mask))
    return sides


# What a path returns, per answer token: (log p, its sequence side-major: chosen of pairs 0..B-1 then rejected,
# log Σ_v p(v)² when the plan asks for WPO's statistic, else None). Every path lists a sequence's tokens together
# and in order, which `_in_sequence` relies on for the positions.
Tokens = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None"]


def _split(out: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    return out if isinstance(out, tuple) else (out, None)


def _plain(lm, batch: Batch, full_logits: bool, chunk_size: int, keep_mib: float = 0,
           collision: bool = False) -> Tokens:
    """Each prompt+answer its own right-padded row (row r = sequence r, side-major)."""
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
    logps, lss = _split(token_logps(lm, states[at[:, 0], at[:, 1]], torch.cat(targets), full_logits, chunk_size,
                                    keep_mib, collision))
    return logps, torch.cat(seg).to(device), lss


def _prefix_shared(lm, batch: Batch, full_logits: bool, chunk_size: int, keep_mib: float = 0,
                   collision: bool = False) -> Tokens:
    """Prompt once with a KV cache, then every answer against it."""
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
    logps, lss = _split(token_logps(lm, predictors[sel], ids[sel], full_logits, chunk_size, keep_mib, collision))
    row = torch.arange(n_sides * b, device=ids.device)[:, None].expand_as(sel)[sel]
    return logps, (row % n_sides) * b + row // n_sides, lss  # interleaved row → side-major sequence


def _packed(lm, batch: Batch, full_logits: bool, plan: ForwardPlan, collision: bool = False) -> Tokens:
    """prompt·chosen·rejected as one sequence per pair."""
    flex = plan.attention == FLEX_ATTENTION
    # 128 = FlexAttention's block size: the compiled kernel then sees few distinct row lengths.
    p = packing.pack(batch, rows=plan.rows, pad_to=128 if plan.rows == "packed" and flex else 1)
    if flex:
        mask = packing.block_mask(p, compile_mask=p.input_ids.is_cuda)
    else:
        # sdpa takes a bool mask in any dtype; eager adds the mask to its scores.
        mask = packing.dense_mask(p, None if plan.attention == "sdpa" else torch.float32)
    states, _ = _states(lm, full_logits, input_ids=p.input_ids, attention_mask=mask, position_ids=p.position_ids,
                        use_cache=False)
    flat = states.reshape(-1, states.shape[-1])
    logps, lss = _split(token_logps(lm, flat[p.predict], p.targets, full_logits, plan.chunk_size,
                                    plan.keep_logits_mib, collision))
    return logps, p.seq, lss


def _in_sequence(seq: torch.Tensor) -> torch.Tensor:
    """Each token's position within its answer (0, 1, ...), given that a sequence's tokens come together, in order
    (in any order of the sequences)."""
    index = torch.arange(len(seq), device=seq.device)
    starts = torch.ones_like(seq, dtype=torch.bool)
    starts[1:] = seq[1:] != seq[:-1]
    return index - index[starts][starts.cumsum(0) - 1]


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


@dataclass(frozen=True)
class ForwardPlan:
    """How every forward of one model runs, decided once (preftune.device.plan_forward) and run as is.

    path: "packed", "cache" or "off" (see the module docstring). chunk_size: LM-head tokens per chunk, 0 = the
    model's own full logits. keep_logits_mib: in training, keep the head's logits for backward up to this size
    (0 = recompute). rows: packed layout, "pair" (one pair per row, dense 4D mask) or "packed" (the micro-batch in
    one row). attention: the attention implementation the packed mask is made for (sdpa: bool, eager: additive,
    flex_attention: BlockMask). keep_dropout: leave the model's dropout rates as they are; otherwise the handle
    turns every one off (scoring runs in eval mode either way). optimizer_kwargs and description: the device's
    AdamW switches and the run's "speed:" line. statistics: what the forward computes beyond the summed
    log-probs (see STATISTICS; none by default, each costs only when asked).
    """

    path: str = "off"
    chunk_size: int = 0
    keep_logits_mib: float = 0.0
    rows: str = "pair"
    attention: str | None = None
    keep_dropout: bool = True
    optimizer_kwargs: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    statistics: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        object.__setattr__(self, "statistics", frozenset(self.statistics))
        unknown = self.statistics - set(STATISTICS)
        if unknown:
            raise ValueError(f"statistics are among {', '.join(STATISTICS)}, got {sorted(unknown)}")
        if self.path not in PATHS:
            raise ValueError(f"a forward path is one of {', '.join(PATHS)}, got {self.path!r}")
        if self.rows not in ("pair", "packed"):
            raise ValueError(f"rows must be 'pair' or 'packed', got {self.rows!r}")

    def values_key(self) -> str:
        """What tells two plans' log-probs apart beyond fp32 rounding (they differ in the low bits of half
        precision, e.g. up to 2.3e-2 per sequence between the KV-cache and packed paths in bf16)."""
        return f"{self.path}/{self.rows}/{self.attention}" if self.path == "packed" else self.path


def forward_logps(model: torch.nn.Module, batch: Batch, plan: ForwardPlan) -> SequenceLogps:
    """Summed answer log-probs of a batch under `model`, computed exactly as `plan` says.

    Args:
        model: a causal LM, possibly wrapped (PEFT, DDP, accelerate).
        batch: from `collate`; B pairs (or SFT examples when `rejected_ids` is None).
        plan: the forward path, LM-head chunking, packed layout and the statistics asked for (see ForwardPlan).
    Returns:
        SequenceLogps with [B] tensors (fp32; float64 for a float64 model).
    """
    lm = causal_lm(model)
    full_logits = plan.chunk_size <= 0
    collision = "aligned" in plan.statistics
    if plan.path == "packed":
        logps, seq, lss = _packed(lm, batch, full_logits, plan, collision)
    else:
        run = _prefix_shared if plan.path == "cache" else _plain
        logps, seq, lss = run(lm, batch, full_logits, plan.chunk_size, plan.keep_logits_mib, collision)
    b = len(batch)
    lengths = [batch.chosen_mask.sum(-1).float()]
    if batch.rejected_mask is not None:
        lengths.append(batch.rejected_mask.sum(-1).float())
    n = b * len(lengths)
    zeros = logps.new_zeros(n)
    sums = {"logps": zeros.index_add(0, seq, logps)}
    if "shared" in plan.statistics and len(lengths) == 2:
        shared = torch.minimum(*lengths).repeat(2).to(seq.device)  # ℓ of each pair, for both its answers
        sums["shared_logps"] = zeros.index_add(0, seq, torch.where(_in_sequence(seq) < shared[seq], logps, 0.0))
    if lss is not None:
        sums["aligned_logps"] = zeros.index_add(0, seq, logps.detach() - lss)
    fields = {f"{side}_{k}": v[s * b:(s + 1) * b] for k, v in sums.items()
              for s, side in enumerate(("chosen", "rejected")[:len(lengths)])}
    return SequenceLogps(chosen_lengths=lengths[0], rejected_lengths=lengths[1] if len(lengths) == 2 else None,
                         desirable=batch.desirable, **fields)


class LogpsModel(torch.nn.Module):
    """The handle: batch → SequenceLogps under one ForwardPlan. A module, so DDP/FSDP wrap *this* and their
    forward hooks (gradient sync, parameter gathering) run around the whole computation even though it calls
    the decoder directly. Unless the plan keeps dropout, every dropout rate of the model (modules and the float
    rates attention code reads) is turned off here, after LoRA was added (its dropout too)."""

    def __init__(self, model: torch.nn.Module, plan: ForwardPlan):
        super().__init__()
        self.model = model
        self.plan = plan
        if not plan.keep_dropout:
            disable_dropout(model)

    def forward(self, batch: Batch) -> SequenceLogps:
        return forward_logps(self.model, batch, self.plan)


def unwrap_handle(handle: torch.nn.Module) -> torch.nn.Module:
    """The LogpsModel inside DDP/DeepSpeed wrappers (FSDP2 keeps it in place)."""
    while not isinstance(handle, LogpsModel) and isinstance(getattr(handle, "module", None), torch.nn.Module):
        handle = handle.module
    return handle


def handle_model(handle: torch.nn.Module) -> torch.nn.Module:
    """The model a handle runs (a PeftModel when LoRA is on); a module that is no handle, itself."""
    inner = unwrap_handle(handle)
    return inner.model if isinstance(inner, LogpsModel) else inner


def statistics_for(ld_alpha: float | None = None, use_weighting: bool = False) -> frozenset[str]:
    """The statistics a DPO-family run needs from its forwards (see STATISTICS): LD-DPO's shared-length sums when
    `ld_alpha` is set, WPO's aligned sums with `use_weighting`."""
    return frozenset({"shared"} if ld_alpha is not None else set()) | frozenset(
        {"aligned"} if use_weighting else set())


@contextlib.contextmanager
def statistics_only(handle: torch.nn.Module, keep: frozenset[str]) -> Iterator[None]:
    """Run `handle` computing only the statistics of its plan that are in `keep` (a reference pass on the
    policy's own handle needs no WPO statistic); the plan is put back afterwards."""
    inner = unwrap_handle(handle)
    if not isinstance(inner, LogpsModel) or inner.plan.statistics <= keep:
        yield
        return
    plan = inner.plan
    inner.plan = dataclasses.replace(plan, statistics=plan.statistics & keep)
    try:
        yield
    finally:
        inner.plan = plan


@contextlib.contextmanager
def inference(module: torch.nn.Module) -> Iterator[None]:
    """Score under `module`: eval mode (dropout off, whatever the caller left on) and no gradients; each
    submodule's own mode is put back afterwards. Not torch.inference_mode: FSDP2 would build its unsharded
    parameters as inference tensors."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, training in modes:
            m.training = training
