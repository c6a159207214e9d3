"""The forward plan (which exact forward path a model runs, decided once) and how many CPU threads.

`plan_forward(model, device, options=..., sharded=..., checkpointing=...)` is the one place that decides how a
model's log-probs are computed; it returns a `logprobs.ForwardPlan` and `logprobs.LogpsModel(model, plan)` (or
`forward_handle`) runs exactly it, in training, the reference pass, evaluation and every scoring command.
Measured choices (BENCHMARKS.md):

- CPU: packed prefix sharing, one pair per row under a dense 4D mask (sdpa); LM head in chunks of up to
  4096 tokens whose logits are kept for backward while a micro-batch's fit in 256 MiB (the recompute is a
  quarter of the head's work and RAM is cheap); threads from `cpu_threads()`.
- CUDA: packed prefix sharing, the whole micro-batch in one unpadded row under a FlexAttention block mask
  (the model's attention is switched to transformers' `flex_attention` unless the user named one, once the
  probe below passes, with a backward when training); else sdpa, one pair per row. LM head chunks sized to
  ~256 MiB of fp32 logits, always recomputed in backward; fused AdamW (no full-size optimizer temporaries).

The probe: a path is taken only when it gives the plain path's log-probs on two synthetic pairs of uneven
lengths, run on a two-layer fp32 model of the same class, config and attention with seeded random weights
(built on the device before any sharding, so the same probe runs under FSDP2/ZeRO-3, with no collective, and
every process decides alike). Two layers, because some failures only show in the second (a NaN at a padding
position reaches real tokens through the next layer's keys). It catches code that ignores or refuses a custom
4D mask (ALiBi models: MPT computes its bias from column indices, Bloom and Falcon cannot unpack a 4D mask) and
a KV-cache path that breaks (eager attention in float64 turns a fully padded prompt row into NaN); a half-precision
model's paths are run once more under autocast to its dtype, for failures of that precision alone.

`cpu_threads()` / `ThreadGovernor`: on a CPU shared with other busy processes, a torch thread pool with
more threads than free cores stalls at every parallel region whenever one of its threads is descheduled
(measured: 4-10x slower under two busy processes on 2 cores, TRL 2.5-2.8x). So the pool is sized to the
cores *other* processes leave free, measured from /proc/stat, and re-sized while training.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from preftune import logprobs
from preftune.data.collate import Batch, collate
from preftune.data.tokenize import TokenizedPair
from preftune.logprobs import ForwardPlan, LogpsModel

log = logging.getLogger("preftune")

# fp32 logits per LM-head chunk, and (CPU) the most a micro-batch may keep alive for backward.
CHUNK_BUDGET_MIB = 256
CPU_KEEP_LOGITS_MIB = 256
MAX_CHUNK = 4096
PROBE_LAYERS, PROBE_VOCAB = 2, 256
Autocast = Callable[[], contextlib.AbstractContextManager]
_NAMES = {"packed": "packed prefix sharing", "cache": "KV-cache prefix sharing", "off": "one row per answer"}


@dataclass(frozen=True)
class ForwardOptions:
    """What the user asked for (the TrainConfig keys of the same names): prefix_sharing auto|packed|cache|off,
    logits_chunk_size auto|N|0, attn_implementation (named by the user: never switched), keep_dropout (False: the
    handle turns dropout off; scoring runs in eval mode either way, so scoring handles leave the model's rates
    alone), statistics (logprobs.STATISTICS the forwards compute beyond the sums)."""

    prefix_sharing: str | bool = "auto"
    logits_chunk_size: int | str = "auto"
    attn_implementation: str | None = None
    keep_dropout: bool = True
    statistics: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        mode = {True: "auto", False: "off"}.get(self.prefix_sharing, self.prefix_sharing)  # type: ignore[call-overload]
        if mode not in ("auto", *logprobs.PATHS):
            raise ValueError(f"prefix_sharing must be auto, packed, cache, off or a bool, got {self.prefix_sharing!r}")
        object.__setattr__(self, "prefix_sharing", mode)

    @classmethod
    def of(cls, cfg) -> ForwardOptions:
        """From a TrainConfig."""
        return cls(cfg.prefix_sharing, cfg.logits_chunk_size, cfg.attn_implementation,
                   keep_dropout=not cfg.disable_dropout,
                   statistics=logprobs.statistics_for(cfg.ld_alpha, cfg.use_weighting))


def chunk_size_for(vocab_size: int) -> int:
    """Largest power of two ≤ MAX_CHUNK whose fp32 [chunk, vocab] logits fit in CHUNK_BUDGET_MIB (≥ 128):
    vocab 8,192 → 4096, Llama-3's 128,256 → 512, Qwen2.5's 151,936 → 256."""
    fit = CHUNK_BUDGET_MIB * 2**20 // (4 * max(vocab_size, 1))
    chunk = 128
    while chunk * 2 <= min(fit, MAX_CHUNK):
        chunk *= 2
    return chunk


def _use_flex(lm: torch.nn.Module, user_attn: str | None, device: torch.device) -> bool:
    if device.type != "cuda" or user_attn:  # the user's explicit choice wins
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


# ----------------------------------------------------------------------------- the probe

def _probe_batch(vocab: int, device: torch.device) -> Batch:
    """Two tiny synthetic pairs of uneven lengths (so prompts are left-padded and answers right-padded)."""
    ids = torch.randint(0, vocab, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    pairs = [TokenizedPair(ids[:7], ids[7:12], ids[12:20], 0), TokenizedPair(ids[20:23], ids[23:32], ids[32:35], 1)]
    return collate(pairs, [0, 1], 0).to(device)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def probe_model(lm: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """A two-layer copy of `lm`'s class and config (same attention and head layout) with seeded random weights and
    a small vocabulary, on `device`, in eval mode, in fp32 (float64 for a float64 model): whether a path is exact
    does not depend on rounding, and half precision's own (2e-2 per token) would hide real errors (measured: a
    2048-wide MPT's ALiBi error of 0.0097 per token passes in bf16, fails in fp32). Built directly from the class
    (not `from_config`, which would partition it under ZeRO-3) and under a forked RNG, so the run's own random
    stream is untouched. Only the config, class and dtype of `lm` are read: its weights may be sharded or meta."""
    cfg = copy.deepcopy(lm.config)
    cfg.num_hidden_layers = min(PROBE_LAYERS, int(getattr(cfg, "num_hidden_layers", PROBE_LAYERS)))
    if isinstance(getattr(cfg, "layer_types", None), list):
        cfg.layer_types = cfg.layer_types[:cfg.num_hidden_layers]
    cfg.vocab_size = min(PROBE_VOCAB, int(cfg.vocab_size))
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if isinstance(getattr(cfg, key, None), int) and getattr(cfg, key) >= cfg.vocab_size:
            setattr(cfg, key, None)
    dtype = torch.float64 if next(lm.parameters()).dtype == torch.float64 else torch.float32
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), _default_dtype(dtype), device:
        torch.manual_seed(0)
        return type(lm)(cfg).eval()


def _failure(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def path_matches_plain(model: torch.nn.Module, path: str, device: torch.device, rows: str = "pair",
                       autocast: Autocast | None = None) -> str | None:
    """Run the probe pairs through `path` and the plain path (under `autocast` if given); None when they agree,
    else why not.

    Tolerance per answer token: 1e-4 in fp32/fp64, 2e-2 in half precision (their rounding alone); a leak of the
    chosen answer into the rejected one or a wrong ALiBi distance moves a random fp32 probe model's log-probs by
    0.009-0.7 per token (measured on Llama, Qwen2 and MPT shapes up to 4096 wide); a NaN is never accepted.
    """
    lm = logprobs.causal_lm(model)
    batch = _probe_batch(lm.get_input_embeddings().weight.shape[0], device)
    impl = logprobs.attention_implementation(lm)
    try:
        with logprobs.inference(model), autocast() if autocast else contextlib.nullcontext():
            got = logprobs.forward_logps(model, batch, ForwardPlan(path, rows=rows, attention=impl))
            plain = logprobs.forward_logps(model, batch, ForwardPlan("off"))
    except Exception as e:  # any failure of the custom mask or the cache means: not this path
        return f"a {path} forward failed ({_failure(e)})"
    tokens = torch.cat([batch.chosen_mask.sum(-1), batch.rejected_mask.sum(-1)]).to(plain.chosen_logps.dtype)
    diff = (torch.cat([got.chosen_logps, got.rejected_logps]) - torch.cat([plain.chosen_logps, plain.rejected_logps]))
    if not bool(torch.isfinite(diff).all()):
        return "it gave non-finite log-probs on a test input"
    tol = 1e-4 if next(lm.parameters()).dtype in (torch.float32, torch.float64) and not autocast else 2e-2
    worst = float((diff.abs() / tokens).max())
    return None if worst <= tol else f"its log-probs differ from the plain path's by {worst:.2g} per token on a test input"


def packed_trains(model: torch.nn.Module, device: torch.device, autocast: Autocast | None = None,
                  rows: str = "packed") -> str | None:
    """One tiny packed forward + backward in training mode (under the run's autocast); None when it runs.

    FlexAttention compiles its backward separately from its forward; a failure there would otherwise only
    surface at the first training step, after the reference pass. The gradients are discarded.
    """
    lm = logprobs.causal_lm(model)
    batch = _probe_batch(lm.get_input_embeddings().weight.shape[0], device)
    was_training = model.training
    model.train()
    plan = ForwardPlan("packed", rows=rows, attention=logprobs.attention_implementation(lm))
    try:
        with autocast() if autocast else contextlib.nullcontext():
            out = logprobs.forward_logps(model, batch, plan)
        (out.chosen_logps.sum() - out.rejected_logps.sum()).backward()
    except Exception as e:
        return f"a packed backward failed ({_failure(e)})"
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return None


def _exact(probe: torch.nn.Module, path: str, device: torch.device, half: Autocast | None,
           rows: str = "pair") -> str | None:
    """The probe in fp32, then (a half-precision model) once more under autocast to the model's dtype, where only
    a failure or NaN of the run's own precision can show."""
    return path_matches_plain(probe, path, device, rows) or (
        path_matches_plain(probe, path, device, rows, autocast=half) if half else None)


def _packed_on_flex(lm: torch.nn.Module, probe: torch.nn.Module, options: ForwardOptions, device: torch.device,
                    training: bool, autocast: Autocast | None, half: Autocast | None) -> bool:
    """Switch the probe, and then the model, to FlexAttention when packed rows run exactly there (CUDA)."""
    if not _use_flex(lm, options.attn_implementation, device):
        return False
    previous = logprobs.attention_implementation(probe)
    if not _switch_attention(probe, logprobs.FLEX_ATTENTION):
        return False
    why = logprobs.packed_unsupported(probe) or _exact(probe, "packed", device, half, rows="packed")
    if why is None and training:
        why = packed_trains(probe, device, autocast or half)
    if why is None and _switch_attention(lm, logprobs.FLEX_ATTENTION):
        return True
    log.warning("FlexAttention cannot run the packed layout here (%s); trying %s", why, previous)
    _switch_attention(probe, previous)
    return False


def _why_not(path: str, lm: torch.nn.Module, probe: torch.nn.Module | None, device: torch.device,
             half: Autocast | None) -> str | None:
    if path == "packed" and logprobs.packed_unsupported(lm):
        return logprobs.packed_unsupported(lm)
    if probe is None:
        return "no test model could be built to check it"
    return _exact(probe, path, device, half if probe is not lm else None)


def _probe_for(lm: torch.nn.Module, device: torch.device, sharded: bool) -> torch.nn.Module | None:
    try:
        return probe_model(lm, device)
    except Exception as e:  # remote code that cannot be rebuilt smaller: probe the model itself if this process has it
        log.info("could not build a two-layer probe model (%s)", _failure(e))
        return None if sharded else lm


def plan_forward(model: torch.nn.Module, device: torch.device | str = "cpu", *,
                 options: ForwardOptions = ForwardOptions(), sharded: bool = False, checkpointing: bool = False,
                 training: bool = True, autocast: Autocast | None = None, sft: bool = False) -> ForwardPlan:
    """The forward plan for `model` on `device`: the first of the paths the options allow (auto and packed:
    packed, then the KV cache, then one row per answer) that the probe finds exact; the KV cache is left out
    under activation checkpointing (`checkpointing`: the model's or the engine's), which replays layers and would
    extend the cache twice. `sharded`: under FSDP2/ZeRO-3 (the probe never runs on the model itself then).
    `training`: a backward will run (the FlexAttention probe includes one, under `autocast`, the run's
    Engine.autocast). `sft`: the batches hold one answer (the "speed:" line then says what runs for it). Each
    fallback is said once.

    Side effect on CUDA: the model's attention is switched to FlexAttention when the packed path will use it and
    the user named no attention implementation. Call before sharding, after gradient checkpointing is set.
    """
    device = torch.device(device)
    lm = logprobs.causal_lm(model)
    mode = options.prefix_sharing
    wanted = {"auto": ["packed", "cache"], "packed": ["packed", "cache"], "cache": ["cache"], "off": []}[mode]
    no_cache = checkpointing and "cache" in wanted
    if no_cache:
        wanted.remove("cache")
    path = "off"
    probe = _probe_for(lm, device, sharded) if wanted else None
    dtype = next(lm.parameters()).dtype
    half = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype in (torch.bfloat16, torch.float16) else None
    flex = probe is not None and "packed" in wanted and _packed_on_flex(lm, probe, options, device, training,
                                                                        autocast, half)
    for k, candidate in enumerate(wanted):
        why = None if candidate == "packed" and flex else _why_not(candidate, lm, probe, device, half)
        if why is None:
            path = candidate
            break
        then = "the KV-cache path" if "cache" in wanted[k + 1:] else "one row per answer"
        logprobs.say_once(f"{_NAMES[candidate]} is off for this model: {why}; using {then}")
    if no_cache and path == "off":
        logprobs.say_once("the KV-cache prefix sharing cannot run under activation checkpointing (layers are "
                          "replayed in backward, which would extend the cache twice); using one row per answer")
    del probe
    head = lm.get_output_embeddings()
    # ZeRO-3 may have partitioned the weights at load (an empty local shape); `ds_shape` keeps the full one.
    vocab = getattr(head.weight, "ds_shape", head.weight.shape)[0] if head is not None else 0
    chunk = int(options.logits_chunk_size) if options.logits_chunk_size != "auto" else chunk_size_for(vocab)
    if chunk and not logprobs.supports_chunked_head(lm):
        chunk = 0
    impl = logprobs.attention_implementation(lm)
    rows = "packed" if path == "packed" and impl == logprobs.FLEX_ATTENTION else "pair"
    # Fused AdamW updates all parameters in one kernel with no full-size temporaries (the foreach default
    # allocates several parameter-sized buffers: GiBs at the peak for a 0.5B model).
    opt = {"fused": True} if device.type == "cuda" else {}
    plan = ForwardPlan(path, chunk, CPU_KEEP_LOGITS_MIB if device.type == "cpu" else 0, rows, impl,
                       options.keep_dropout, opt, statistics=options.statistics)
    return dataclasses.replace(plan, description=describe(plan, checkpointing, device, sft=sft))


def forward_handle(model: torch.nn.Module, device: torch.device | str | None = None, *,
                   options: ForwardOptions = ForwardOptions()) -> LogpsModel:
    """A scoring handle for a loaded model (eval, inspect, score_records): its plan decided here, once."""
    if isinstance(logprobs.unwrap_handle(model), LogpsModel):
        return model  # type: ignore[return-value]
    device = device if device is not None else next(model.parameters()).device
    return LogpsModel(model, plan_forward(model, device, options=options, training=False))


def describe(plan: ForwardPlan, checkpointing: bool, device: torch.device, sft: bool = False) -> str:
    """The run's "speed:" line; `sft`: for examples with one answer (SFT's, KTO's), which no prompt is shared by."""
    rows = ("the micro-batch in one row, FlexAttention block mask" if plan.rows == "packed"
            else f"one {'example' if sft else 'pair'} per row, {plan.attention} 4D mask")
    if sft:
        parts = {"packed": f"packed rows (prompt·completion as one sequence, {rows})",
                 "cache": "KV cache (the completion continues from the prompt's)",
                 "off": "plain rows (prompt·completion, one row per example)"}
    else:
        parts = {"packed": f"packed prefix sharing (prompt·chosen·rejected as one sequence, {rows})",
                 "cache": "KV-cache prefix sharing", "off": "no prefix sharing (one row per answer)"}
    text = [parts[plan.path]]
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
