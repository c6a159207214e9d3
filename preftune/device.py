"""Device-dependent speed choices: which exact forward path a run uses, and how many CPU threads.

`plan_forward(cfg, model, device)` resolves the `auto` speed settings of a TrainConfig for this model on
this device and returns a ForwardPlan (the options for `LogpsModel`, for the reference pass, for AdamW, and
a one-line description for the run's first lines). Measured choices (BENCHMARKS.md):

- CPU: packed prefix sharing, one pair per row under a dense 4D mask (sdpa); LM head in chunks of up to
  4096 tokens whose logits are kept for backward while a micro-batch's fit in 256 MiB (the recompute is a
  quarter of the head's work and RAM is cheap); threads from `cpu_threads()`.
- CUDA: packed prefix sharing, the whole micro-batch in one unpadded row under a FlexAttention block mask
  (the model's attention is switched to transformers' `flex_attention` unless the config names one, once a
  tiny packed forward matches the plain path and a tiny backward runs; else sdpa, one pair per row); LM
  head chunks sized to ~256 MiB of fp32 logits, always recomputed in backward; fused AdamW (no full-size
  optimizer temporaries). Not yet measured on a GPU: bench/gpu_run.sh measures it.

`cpu_threads()` / `ThreadGovernor`: on a CPU shared with other busy processes, a torch thread pool with
more threads than free cores stalls at every parallel region whenever one of its threads is descheduled
(measured: 4-10x slower under two busy processes on 2 cores, TRL 2.5-2.8x). So the pool is sized to the
cores *other* processes leave free, measured from /proc/stat, and re-sized while training.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from preftune import logprobs

log = logging.getLogger("preftune")

# fp32 logits per LM-head chunk, and (CPU) the most a micro-batch may keep alive for backward.
CHUNK_BUDGET_MIB = 256
CPU_KEEP_LOGITS_MIB = 256
MAX_CHUNK = 4096


@dataclass
class ForwardPlan:
    prefix_sharing: str            # "packed", "cache" or "off": the path that runs
    chunk_size: int                # LM-head chunk in tokens; 0 = the model's own full logits
    keep_logits_mib: float         # keep head logits for backward up to this size (0 = always recompute)
    attn_implementation: str | None
    rows: str | None               # packed layout: "pair" or "packed" (None: not packed)
    optimizer_kwargs: dict[str, Any] = field(default_factory=dict)
    description: str = ""

    def policy_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of LogpsModel / forward_logps for the trained policy."""
        return dict(prefix_sharing=self.prefix_sharing, chunk_size=self.chunk_size,
                    keep_logits_mib=self.keep_logits_mib)

    def reference_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of the reference strategies and scoring (no gradients there)."""
        return dict(prefix_sharing=self.prefix_sharing, chunk_size=self.chunk_size)


def chunk_size_for(vocab_size: int) -> int:
    """Largest power of two ≤ MAX_CHUNK whose fp32 [chunk, vocab] logits fit in CHUNK_BUDGET_MIB (≥ 128):
    vocab 8,192 → 4096, Llama-3's 128,256 → 512, Qwen2.5's 151,936 → 256."""
    fit = CHUNK_BUDGET_MIB * 2**20 // (4 * max(vocab_size, 1))
    chunk = 128
    while chunk * 2 <= min(fit, MAX_CHUNK):
        chunk *= 2
    return chunk


def _use_flex(lm: torch.nn.Module, cfg_attn: str | None, device: torch.device) -> bool:
    if device.type != "cuda" or cfg_attn:  # the user's explicit choice wins
        return False
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return bool(getattr(lm, "_supports_flex_attn", False))


def _switch_attention(lm: torch.nn.Module, impl: str) -> bool:
    try:
        if hasattr(lm, "set_attn_implementation"):
            lm.set_attn_implementation(impl)
        else:
            lm.config._attn_implementation = impl
        return True
    except (ValueError, ImportError, AttributeError) as e:
        log.warning("could not switch attention to %s (%s); keeping %s", impl, str(e).splitlines()[0],
                    logprobs.attention_implementation(lm))
        return False


def _probe_batch(lm: torch.nn.Module, device: torch.device):
    """Two tiny synthetic pairs of uneven lengths (token ids drawn with a fixed seed)."""
    from preftune.data.collate import collate
    from preftune.data.tokenize import TokenizedPair

    vocab = lm.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    pairs = [TokenizedPair(ids[:7], ids[7:12], ids[12:20], 0), TokenizedPair(ids[20:23], ids[23:32], ids[32:35], 1)]
    return collate(pairs, [0, 1], 0).to(device)


def _failure(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


@torch.no_grad()
def packed_matches_plain(model: torch.nn.Module, device: torch.device) -> str | None:
    """Run two tiny synthetic pairs both packed and plain; None when they agree, else why not.

    Catches models whose code ignores a custom 4D mask (remote code, older architectures). Tolerance per
    answer token: 1e-4 in fp32, 2e-2 in half precision (their rounding alone); a leak of the chosen answer
    into the rejected one moves log-probs by far more in a trained model.
    """
    lm = logprobs.causal_lm(model)
    batch = _probe_batch(lm, device)
    was_training = model.training
    model.eval()
    try:
        packed = logprobs.forward_logps(model, batch, prefix_sharing="packed", chunk_size=0)
        plain = logprobs.forward_logps(model, batch, prefix_sharing="off", chunk_size=0)
    except Exception as e:  # any failure of the custom mask means: not this path
        return f"a packed forward failed ({_failure(e)})"
    finally:
        model.train(was_training)
    tokens = torch.cat([batch.chosen_mask.sum(-1), batch.rejected_mask.sum(-1)]).float()
    diff = (torch.cat([packed.chosen_logps, packed.rejected_logps]) -
            torch.cat([plain.chosen_logps, plain.rejected_logps])).abs() / tokens
    tol = 1e-4 if next(lm.parameters()).dtype == torch.float32 else 2e-2
    worst = float(diff.max())
    return None if worst <= tol else f"packed and plain log-probs differ by {worst:.2g} per token on a test input"


def packed_trains(model: torch.nn.Module, device: torch.device, autocast_dtype: torch.dtype | None) -> str | None:
    """One tiny packed forward + backward in training mode (under the run's autocast); None when it runs.

    FlexAttention compiles its backward separately from its forward; a failure there would otherwise only
    surface at the first training step, after the reference pass. The gradients are discarded.
    """
    batch = _probe_batch(logprobs.causal_lm(model), device)
    was_training = model.training
    model.train()
    try:
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            out = logprobs.forward_logps(model, batch, prefix_sharing="packed", chunk_size=0)
        (out.chosen_logps.sum() - out.rejected_logps.sum()).backward()
    except Exception as e:
        return f"a packed backward failed ({_failure(e)})"
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return None


def _packed_backend(model: torch.nn.Module, cfg, device: torch.device) -> str | None:
    """Make the model ready for the packed path (FlexAttention on CUDA); None when it runs exactly, else why not."""
    lm = logprobs.causal_lm(model)
    previous = logprobs.attention_implementation(lm)
    if _use_flex(lm, cfg.attn_implementation, device) and _switch_attention(lm, logprobs.FLEX_ATTENTION):
        autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision)
        why = logprobs.packed_unsupported(lm) or packed_matches_plain(model, device) or \
            packed_trains(model, device, autocast)
        if why is None:
            return None
        log.warning("FlexAttention cannot run the packed layout here (%s); trying %s", why, previous)
        _switch_attention(lm, previous)
    return logprobs.packed_unsupported(lm) or packed_matches_plain(model, device)


def plan_forward(cfg, model: torch.nn.Module, device: torch.device | str) -> ForwardPlan:
    """Resolve cfg.prefix_sharing / cfg.logits_chunk_size for `model` (already on `device`).

    Side effect on CUDA: the model's attention is switched to FlexAttention when the packed path will use
    it and cfg.attn_implementation is unset. Call after gradient checkpointing is configured.
    """
    device = torch.device(device)
    lm = logprobs.causal_lm(model)
    mode = {True: "auto", False: "off"}.get(cfg.prefix_sharing, cfg.prefix_sharing)
    if mode in ("auto", "packed"):
        why = _packed_backend(model, cfg, device)
        if why:
            logprobs.say_once(f"packed prefix sharing is off for this model: {why}; using the KV-cache path")
        mode = "cache" if why else "packed"
    if mode == "cache" and cfg.gradient_checkpointing:
        logprobs.say_once("the KV-cache prefix sharing cannot run under activation checkpointing; "
                          "using one row per answer")
        mode = "off"
    head = lm.get_output_embeddings()
    chunk = int(cfg.logits_chunk_size) if cfg.logits_chunk_size != "auto" else \
        chunk_size_for(head.weight.shape[0] if head is not None else 0)
    if chunk and not logprobs.supports_chunked_head(lm):
        chunk = 0
    keep = CPU_KEEP_LOGITS_MIB if device.type == "cpu" else 0
    impl = logprobs.attention_implementation(lm)
    rows = None if mode != "packed" else ("packed" if impl == logprobs.FLEX_ATTENTION else "pair")
    # Fused AdamW updates all parameters in one kernel with no full-size temporaries (the foreach default
    # allocates several parameter-sized buffers: GiBs at the peak for a 0.5B model).
    opt = {"fused": True} if device.type == "cuda" else {}
    plan = ForwardPlan(mode, chunk, keep, impl, rows, opt)
    plan.description = describe(plan, bool(cfg.gradient_checkpointing), device)
    return plan


def describe(plan: ForwardPlan, checkpointing: bool, device: torch.device) -> str:
    parts = {"packed": "packed prefix sharing (prompt·chosen·rejected as one sequence, "
                       + ("the micro-batch in one row, FlexAttention block mask)" if plan.rows == "packed"
                          else f"one pair per row, {plan.attn_implementation} 4D mask)"),
             "cache": "KV-cache prefix sharing", "off": "no prefix sharing (one row per answer)"}
    text = [parts[plan.prefix_sharing]]
    if plan.chunk_size:
        recompute = f"kept for backward up to {plan.keep_logits_mib:g} MiB" if plan.keep_logits_mib \
            else "recomputed in backward"
        text.append(f"LM head in chunks of {plan.chunk_size} tokens (logits {recompute})")
    else:
        text.append("full logits")
    text.append("activation checkpointing " + ("on" if checkpointing else "off"))
    if plan.optimizer_kwargs.get("fused"):
        text.append("fused AdamW")
    if device.type == "cpu":
        text.append(f"{torch.get_num_threads()} CPU thread(s)")
    return "speed: " + ", ".join(text)


# ----------------------------------------------------------------------------- CPU threads

def _busy_jiffies() -> tuple[float, float] | None:
    """(busy, total) CPU jiffies of the whole machine since boot, from /proc/stat (None off Linux)."""
    try:
        with open("/proc/stat") as f:
            fields = [float(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _threads_for(other_busy_cores: float, cores: int) -> int:
    # A thread we add onto a core that another process keeps busy costs a stall at every parallel
    # region; one thread per core the others leave (mostly) free, at least one.
    return max(1, min(cores, int(cores - other_busy_cores + 0.3)))


class ThreadGovernor:
    """Keeps torch's intra-op thread count at the number of cores other processes leave free.

    `update()` is cheap (one read of /proc/stat) and re-decides at most every `interval` seconds from the
    machine's busy time minus this process's own CPU time over that interval. Call it once per optimizer
    step. Inactive (never changes threads) when OMP_NUM_THREADS/MKL_NUM_THREADS is set or off Linux.
    """

    def __init__(self, interval: float = 2.0) -> None:
        self.cores = _cores()
        self.interval = interval
        self.active = self.cores > 1 and _busy_jiffies() is not None and not _threads_pinned()
        self._mark()

    def _mark(self) -> None:
        self._t = time.monotonic()
        self._own = time.process_time()
        self._jiffies = _busy_jiffies()

    def other_busy_cores(self) -> float | None:
        now, jiffies = time.monotonic(), _busy_jiffies()
        if jiffies is None or self._jiffies is None or now - self._t <= 0:
            return None
        busy, total = jiffies[0] - self._jiffies[0], jiffies[1] - self._jiffies[1]
        if total <= 0:
            return None
        machine = self.cores * busy / total  # cores busy on average, everybody included
        own = (time.process_time() - self._own) / (now - self._t)
        return max(0.0, machine - own)

    def update(self, force: bool = False) -> int:
        if not self.active or (not force and time.monotonic() - self._t < self.interval):
            return torch.get_num_threads()
        others = self.other_busy_cores()
        self._mark()
        if others is not None:
            n = _threads_for(others, self.cores)
            if n != torch.get_num_threads():
                torch.set_num_threads(n)
        return torch.get_num_threads()


def _threads_pinned() -> bool:
    return any(os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"))


def cpu_threads(sample_s: float = 0.1) -> ThreadGovernor:
    """Set torch's threads for this machine's current load and return a governor to call every step.

    Samples the other processes' CPU use for `sample_s` seconds (10 jiffies per core at Linux's 100 Hz:
    enough to tell a busy core from an idle one). Leaves a pinned thread count alone.
    """
    gov = ThreadGovernor()
    if gov.active:
        time.sleep(sample_s)
        gov.update(force=True)
    return gov
