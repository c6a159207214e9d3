"""`preftune plan`: how much memory a DPO run needs per GPU under each engine, and the smallest setup that fits.

The model's shape comes from its config alone (a folder, a config.json, or a hub name already in the local
cache): the parameters are counted exactly on the meta device, nothing is downloaded or loaded.

Per GPU, for P parameters (Pt trainable) on W processes; full fine-tuning keeps fp32 weights under bf16
autocast / mixed precision (4 bytes weight, 4 gradient, 8 AdamW moments), LoRA keeps a bf16 base and fp32
adapters:

    engine     weights                 gradients            optimizer        working set
    DDP        4P (+2P autocast copies) 4P (+4P DDP buckets) 8P               -
    ZeRO-2     2P (bf16)               2P/W                 12P/W (fp32 master + moments)
    ZeRO-3     2P/W                    2P/W                 12P/W            2 decoder layers gathered
    FSDP2      4P/W (fp32 shards)      4P/W                 8P/W             2 layers + embeddings/head gathered

CPU offload moves weights, gradients and optimizer to host RAM (the working set stays). Activations per
micro-batch: T = batch × 2 × seq_len tokens (prompt + two answers, no prefix sharing: the worst case) ×
layers × (13·hidden + 4·intermediate) values — measured within 10% on CPU with saved-tensor hooks (tiny
Llamas, fp32) — at 4 bytes (fp32) or about 2.5 (bf16 autocast: the residual stream and norms stay fp32),
plus one layer more for backward; activation checkpointing keeps one fp32 hidden state per token per layer
plus two layers' worth (recomputation and its backward). The
chunked head adds a transient chunk × vocab × 12 bytes. These are estimates (±20%): the allocator, CUDA
context (~1-2 GB, added as OVERHEAD) and fragmentation come on top, so a plan that fits with <10% to spare
may not.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from preftune.command_options import GB, PlanOptions, parse_memory
from preftune.errors import PreftuneError
from preftune.modeling.load import check_model_config

OVERHEAD = 2 * GB  # CUDA context, cuBLAS/NCCL workspaces
HEADROOM = 0.9  # use at most 90% of a GPU: fragmentation
CONFIGS = {"single": "configs/accelerate/1gpu.yaml", "ddp": "configs/accelerate/ddp_8gpu.yaml",
           "zero2": "configs/accelerate/zero2_8gpu.yaml", "zero3": "configs/accelerate/zero3_8gpu.yaml",
           "fsdp2": "configs/accelerate/fsdp2_8gpu.yaml", "fsdp2-2nodes": "configs/accelerate/fsdp2_2nodes.yaml"}


@dataclass
class Shape:
    """What the estimates need from a model config."""

    name: str
    params: int
    hidden: int
    intermediate: int
    layers: int
    vocab: int
    layer_params: int  # one decoder layer
    edge_params: int  # embeddings, final norm and head (outside the decoder layers)
    lora_params: int  # trainable parameters of LoRA on all linear layers of the decoder at rank `lora_r`


@dataclass
class Setup:
    engine: str  # single, ddp, zero2, zero3, fsdp2
    gpus: int
    lora: bool
    checkpointing: bool = False
    offload: bool = False

    @property
    def label(self) -> str:
        names = {"single": "1 GPU", "ddp": "DDP", "zero2": "ZeRO-2", "zero3": "ZeRO-3", "fsdp2": "FSDP2"}
        extras = (["act. ckpt"] if self.checkpointing else []) + (["CPU offload"] if self.offload else [])
        return names[self.engine] + (f" ×{self.gpus}" if self.engine != "single" else "") + \
            (" + " + " + ".join(extras) if extras else "")


@dataclass
class Estimate:
    setup: Setup
    weights: float
    grads: float
    optimizer: float
    working: float  # gathered layers (FSDP2/ZeRO-3), autocast weight copies, DDP buckets
    activations: float
    host: float  # per node, with CPU offload
    step: float = 0.0  # AdamW's foreach temporaries (a copy of the moments' square roots), once backward is done
    overhead: float = OVERHEAD

    @property
    def total(self) -> float:
        """The peak: states + working set + the larger of the activations (forward/backward) and the optimizer
        step's temporaries (the activations are freed by then)."""
        return (self.weights + self.grads + self.optimizer + self.working + max(self.activations, self.step)
                + self.overhead)


def load_shape(model: str, lora_r: int = 16) -> Shape:
    """Count a model's parameters from its config alone (meta device: no weights are read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(model).expanduser()
    check_model_config(model, memory=False)  # plan is for machines other than this one
    try:
        if path.is_file():
            config = AutoConfig.for_model(**json.loads(path.read_text()))
        else:
            config = AutoConfig.from_pretrained(str(path) if path.is_dir() else model, local_files_only=True)
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        why = "not found" if not path.exists() else str(e).splitlines()[0]
        raise PreftuneError(f"could not read a model config from {model} ({why}); pass a model folder, its "
                            "config.json, or a hub name whose config is in the local cache (nothing is "
                            "downloaded).") from None
    with torch.device("meta"):
        try:
            net = AutoModelForCausalLM.from_config(config)
        except ValueError as e:
            raise PreftuneError(f"{model} is not a causal language model config ({str(e).splitlines()[0]}).") \
                from None
    text = getattr(config, "get_text_config", lambda: config)()
    layers = [m for m in net.modules() if type(m).__name__ in (getattr(net, "_no_split_modules", None) or ())]
    layer_params = max((sum(p.numel() for p in m.parameters()) for m in layers), default=0)
    params = sum(p.numel() for p in net.parameters())
    lora = sum(lora_r * (m.in_features + m.out_features) for layer in layers for m in layer.modules()
               if isinstance(m, torch.nn.Linear))
    return Shape(name=model, params=params, hidden=text.hidden_size,
                 intermediate=getattr(text, "intermediate_size", 4 * text.hidden_size),
                 layers=text.num_hidden_layers, vocab=text.vocab_size, layer_params=layer_params,
                 edge_params=params - layer_params * len(layers), lora_params=lora)


def activation_bytes(shape: Shape, *, batch_size: int, seq_len: int, checkpointing: bool, bf16: bool = True,
                     chunk_size: int = 1024) -> float:
    """Activations of one micro-batch on one GPU (see the module docstring for the constants)."""
    tokens = batch_size * 2 * seq_len
    per_value = 2.5 if bf16 else 4.0
    per_token_layer = (13 * shape.hidden + 4 * shape.intermediate) * per_value
    # Backward holds one layer's activations more (the gradients flowing through it; with checkpointing,
    # also its recomputed forward).
    if checkpointing:
        body = tokens * shape.layers * shape.hidden * 4 + 2 * tokens * per_token_layer  # fp32 layer inputs
    else:
        body = (shape.layers + 1) * tokens * per_token_layer
    head = min(chunk_size or tokens, tokens) * shape.vocab * 12
    return body + head


def estimate(shape: Shape, setup: Setup, *, batch_size: int, seq_len: int, gpus_per_node: int = 8,
             bf16: bool = True, gpu: bool = True, reference_copy: bool = False) -> Estimate:
    """Bytes per GPU of one setup (see the module docstring). `bf16=False`: fp32 throughout (no autocast);
    `gpu=False`: a CPU process (no CUDA overhead; AdamW steps parameter by parameter, no foreach copies).
    `reference_copy`: the run holds a frozen copy of the policy's weights as its reference (`--reference copy`,
    what TR-DPO's `sync_ref_model` needs), placed and sharded like them; counted in `weights`. The default
    (precomputed reference log-probs, or a reference-free loss) holds none."""
    w, e = setup.gpus, setup.engine
    p = shape.params
    pt = shape.lora_params if setup.lora else p
    base = 2 * p if setup.lora else 0  # LoRA: the frozen bf16 base
    if e in ("single", "ddp"):
        weights, grads, opt = base + 4 * pt, 4 * pt, 8 * pt
        working = (2 * pt if bf16 else 0) + (4 * pt if e == "ddp" else 0)  # autocast copies, DDP buckets
    elif e == "zero2":
        weights, grads, opt = (2 * p if setup.lora else 2 * pt), 2 * pt / w, 12 * pt / w
        working = 0
    else:  # zero3, fsdp2: everything sharded; gathered working set in bf16
        if setup.lora:
            weights, grads, opt = base / w + 4 * pt / w, 4 * pt / w, 8 * pt / w
        elif e == "zero3":
            weights, grads, opt = 2 * p / w, 2 * p / w, 12 * p / w
        else:
            weights, grads, opt = 4 * p / w, 4 * p / w, 8 * p / w
        # Two decoder layers gathered (the current and the prefetched one), plus FSDP2's root unit (embeddings
        # and head, gathered for the whole step in preftune's wrapping) with its unsharded gradient.
        gathered = 2 if bf16 else 4
        working = 2 * gathered * shape.layer_params + (shape.edge_params * (gathered + (0 if setup.lora else 4))
                                                        if e == "fsdp2" else 0)
    if reference_copy:
        weights *= 2
    host = 0.0
    if setup.offload:
        host = (weights + grads + opt) * min(w, gpus_per_node)
        weights = grads = opt = 0.0
    acts = activation_bytes(shape, batch_size=batch_size, seq_len=seq_len, checkpointing=setup.checkpointing,
                            bf16=bf16)
    step = 4 * pt / (1 if e in ("single", "ddp") else w) if gpu else 0.0
    return Estimate(setup, weights, grads, opt, working, acts, host, step, OVERHEAD if gpu else 0.0)


def candidates(gpus: int, lora: bool) -> list[Setup]:
    """Setups in the order they are preferred at a given GPU count: simpler and faster first."""
    if gpus == 1:
        return [Setup("single", 1, lora), Setup("single", 1, lora, checkpointing=True),
                Setup("fsdp2", 1, lora, checkpointing=True, offload=True)]
    # FSDP2 before DeepSpeed: torch's own, tested here, and nothing extra to install.
    out = [Setup("ddp", gpus, lora), Setup("ddp", gpus, lora, checkpointing=True)]
    for engine in ("fsdp2", "zero2", "zero3"):
        out += [Setup(engine, gpus, lora), Setup(engine, gpus, lora, checkpointing=True)]
    return out + [Setup(e, gpus, lora, checkpointing=True, offload=True) for e in ("fsdp2", "zero3")]


def smallest_fit(shape: Shape, *, lora: bool, gpu_memory: float, max_gpus: int, batch_size: int, seq_len: int,
                 offload: bool = False, reference_copy: bool = False) -> Estimate | None:
    """Fewest GPUs first (1, 2, 4, 8, then whole 8-GPU nodes), then the first setup that fits; with or without
    CPU offload (slow: every step moves the weights over PCIe, so it is only worth it for fewer GPUs)."""
    counts = [n for n in (1, 2, 4, 8, 16, 32, 64, 128) if n <= max_gpus]
    for n in counts:
        for setup in candidates(n, lora):
            if setup.offload != offload:
                continue
            est = estimate(shape, setup, batch_size=batch_size, seq_len=seq_len, reference_copy=reference_copy)
            if est.total <= gpu_memory * HEADROOM:
                return est
    return None


def config_hint(est: Estimate) -> str:
    s = est.setup
    if s.engine == "single":
        path = CONFIGS["single"]
    elif s.gpus > 8:
        path = CONFIGS["fsdp2-2nodes"] + f" (num_machines: {s.gpus // 8}, num_processes: {s.gpus})"
    else:
        path = CONFIGS[s.engine] + (f" with num_processes: {s.gpus}" if s.gpus != 8 else "")
    flags = []
    if s.checkpointing:
        flags.append("fsdp_activation_checkpointing: true" if s.engine == "fsdp2" else "--gradient-checkpointing")
    if s.offload:
        flags.append("fsdp_offload_params: true" if s.engine == "fsdp2" else "offload_param/optimizer_device: cpu")
    return path + ("; " + ", ".join(flags) if flags else "")


def _gb(x: float) -> str:
    return f"{x / GB:7.1f}"


def report(shape: Shape, *, gpus: int, gpu_memory: float, lora: bool, batch_size: int, seq_len: int,
           lora_r: int, reference_copy: bool = False) -> str:
    """The printed plan: both full fine-tuning and LoRA at `gpus` GPUs, then the smallest setup that fits."""
    size = f"{shape.params / 1e9:.2f}B" if shape.params >= 1e8 else f"{shape.params / 1e6:.1f}M"
    lines = [f"{shape.name}: {size} parameters ({shape.layers} layers, hidden {shape.hidden}, "
             f"vocab {shape.vocab}); LoRA r={lora_r} on all linear layers: {shape.lora_params / 1e6:.1f}M trainable",
             f"per GPU, GB; micro-batch {batch_size} pairs × seq_len {seq_len}; bf16 mixed precision; "
             f"+{OVERHEAD / GB:.0f} GB CUDA overhead; a GPU of {gpu_memory / GB:.0f} GB fits up to "
             f"{gpu_memory * HEADROOM / GB:.0f}"]
    if reference_copy:
        lines.append("weights include a frozen reference copy (--reference copy, what --sync-ref-model needs)")
    header = f"  {'setup':36} {'weights':>7} {'grads':>7} {'optim':>7} {'working':>7} {'activ.':>7} {'total':>7}  fits"
    for mode in (False, True):
        lines += ["", ("LoRA" if mode else "full fine-tuning") + f" on {gpus} GPU{'s' if gpus > 1 else ''}:", header]
        for setup in candidates(gpus, mode):
            est = estimate(shape, setup, batch_size=batch_size, seq_len=seq_len, reference_copy=reference_copy)
            fits = "yes" if est.total <= gpu_memory * HEADROOM else "no"
            host = f"  (+{est.host / GB:.0f} GB host RAM per node)" if est.host else ""
            lines.append(f"  {setup.label:36} {_gb(est.weights)} {_gb(est.grads)} {_gb(est.optimizer)} "
                         f"{_gb(est.working)} {_gb(est.activations)} {_gb(est.total)}  {fits}{host}")
    what = "LoRA" if lora else "full fine-tuning"
    lines.append("")
    kw = dict(lora=lora, gpu_memory=gpu_memory, max_gpus=128, batch_size=batch_size, seq_len=seq_len,
              reference_copy=reference_copy)
    best, offloaded = smallest_fit(shape, **kw), smallest_fit(shape, offload=True, **kw)
    if best is None and offloaded is None:
        lines.append(f"no setup of up to 128 GPUs fits {what}: lower --batch-size or --seq-len, or use --lora.")
    for est, title in ((best, "smallest setup"), (offloaded, "with CPU offload")):
        if est is None or (title != "smallest setup" and best is not None and est.setup.gpus >= best.setup.gpus):
            continue
        more = f" — more than the {gpus} GPUs given" if est.setup.gpus > gpus else ""
        host = f", {est.host / GB:.0f} GB host RAM per node" if est.host else ""
        lines.append(f"{title} for {what}: {est.setup.label} ({_gb(est.total).strip()} GB per GPU{host}){more}")
        lines.append(f"  accelerate config: {config_hint(est)}")
        if est.setup.engine in ("fsdp2", "zero3"):
            lines.append(f"  final/ is gathered on the main process: ~{shape.params * (2 if lora else 4) / GB:.0f} GB "
                         "of host RAM there")
    return "\n".join(lines)


def run_plan(options: PlanOptions) -> int:
    """`preftune plan`: print the report for checked options (command_options.PlanOptions)."""
    shape = load_shape(options.model, lora_r=options.lora_r)
    print(report(shape, gpus=options.gpus, gpu_memory=parse_memory(options.gpu_memory), lora=options.lora,
                 batch_size=options.batch_size, seq_len=options.seq_len, lora_r=options.lora_r,
                 reference_copy=options.reference == "copy"))
    return 0
