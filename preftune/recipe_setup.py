"""The recipe's setup phases that only build things, each a function of the config and the engine: the data (the
tokenizer, max_length capped at the model's context, the tokenized splits), the model with its forward plan, and
the trainable model with its optimizer. The recipe (recipe.py) calls them in order, times each phase for its
callbacks, and keeps what they return; the run folder, the reference and resuming stay there.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from preftune.config import TrainConfig
from preftune.data.splits import DataSettings, Split, load_splits
from preftune.data.tokenize import TokenizedPair
from preftune.device import ForwardOptions, plan_forward
from preftune.distributed import Engine
from preftune.logprobs import ForwardPlan
from preftune.modeling.load import (
    add_lora,
    check_vocabulary,
    context_length,
    load_model,
    load_tokenizer,
    prepare_for_training,
)
from preftune.onpolicy.online import OnlineBatches
from preftune.optim import build_optimizer


def load_data(cfg: TrainConfig, task: str, model_path: str, engine: Engine,
              cache_dir: Path) -> tuple[TrainConfig, Any, Split | OnlineBatches, Split | None]:
    """(the config with max_length capped at the model's context, the tokenizer, the train split, the eval split
    or None): validated and tokenized before the (expensive) model load; the lines worth reading are printed."""
    tokenizer = load_tokenizer(model_path, trust_remote_code=cfg.trust_remote_code)
    capped, note = cfg.fit_to_context(context_length(model_path, trust_remote_code=cfg.trust_remote_code))
    if note:
        engine.print(note)
    if cfg.online:  # pairs sampled and judged at every step: its prompts stand in for the data (onpolicy/online.py)
        online = OnlineBatches(capped, tokenizer, task=task, engine=engine)
        engine.print(online.summary)
        return capped, tokenizer, online, None
    # A shared cache: one process per machine tokenizes, the others read (a setting: the same on every process)
    with engine.local_main_first(bool(cfg.data_cache_dir)):
        train, held = load_splits(DataSettings.of(capped), tokenizer, task, cache_dir=cache_dir)
    engine.print(train.summary)
    return capped, tokenizer, train, held


def load_policy(cfg: TrainConfig, task: str, model_path: str, tokenizer: Any,
                pair_sets: Sequence[Sequence[TokenizedPair]], engine: Engine) -> tuple[torch.nn.Module, ForwardPlan]:
    """The model, checked against the tokenizer and every split's ids (`pair_sets`), ready for training on its
    device, and its forward plan. `task`: the objective's name (dpo, sft, or unpaired for KTO's examples)."""
    model = load_model(model_path, dtype=cfg.dtype, attn_implementation=cfg.attn_implementation,
                       trust_remote_code=cfg.trust_remote_code, allow_pickle=cfg.allow_pickle, say=engine.print)
    check_vocabulary(model, tokenizer, *pair_sets)
    prepare_for_training(model, gradient_checkpointing=cfg.gradient_checkpointing)
    if not engine.sharded:  # FSDP2 and ZeRO-3 move each process's shard to its device themselves
        model.to(engine.device)
    # The fastest exact forward (device.py), decided once before any sharding; every forward runs it.
    plan = plan_forward(model, engine.device, options=ForwardOptions.of(cfg), sharded=engine.sharded,
                        checkpointing=cfg.gradient_checkpointing or engine.activation_checkpointing,
                        autocast=engine.autocast, sft=task in ("sft", "unpaired"))  # one answer a row
    return model, plan


def trainable(cfg: TrainConfig, model: torch.nn.Module,
              plan: ForwardPlan) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The model with LoRA adapters when asked, and AdamW over its trainable parameters (with the plan's
    device switches)."""
    if cfg.lora:
        model = add_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                         target_modules=cfg.lora_target_modules)
        if cfg.gradient_checkpointing:
            model.enable_input_require_grads()
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate,
                                betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
                                weight_decay=cfg.weight_decay, **plan.optimizer_kwargs)
    return model, optimizer
