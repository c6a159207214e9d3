"""Sampling from a model: prompts → completions, batched (`preftune generate`, and `preftune eval`'s samples).

    from preftune.generate import generate, load_model_for_generation
    model, tok = load_model_for_generation("runs/dpo/final")        # a full model folder or a LoRA adapter folder
    outs = generate(model, tok, ["question: red cat answer:"], max_new_tokens=32, temperature=0.7, seed=1)
    outs[0].text, outs[0].ids, outs[0].stopped

Prompts are encoded exactly as training encodes them (`preftune.data.tokenize.tokenize_texts`: special tokens
once, BOS not doubled after a chat template), so a model is sampled in the context it was trained in.
Decoding starts from the model's own generation config (its EOS tokens, for instance) with the sampling
settings given here on top; `pure=True` switches off every other logits processor (top-k, repetition
penalty, a minimum length...) so that samples are drawn from the model's distribution itself, as a
Monte-Carlo KL estimate needs. Results depend on the seed and the batch size (rows share a random stream).
"""

from __future__ import annotations

import copy
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from preftune.errors import PreftuneError

# Logits processors a model's generation config may switch on; `pure` sampling sets each to its neutral value.
_NEUTRAL = {"top_k": 0, "top_p": 1.0, "min_p": None, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0,
            "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0,
            "bad_words_ids": None, "min_length": 0, "min_new_tokens": None, "suppress_tokens": None,
            "begin_suppress_tokens": None, "forced_bos_token_id": None, "forced_eos_token_id": None,
            "sequence_bias": None, "exponential_decay_length_penalty": None, "renormalize_logits": False}


@dataclass
class Completion:
    """One generated answer: its text, the token ids drawn (EOS last when the model stopped by itself)."""

    text: str
    ids: list[int]
    stopped: bool  # False: cut at max_new_tokens

    @property
    def num_tokens(self) -> int:
        """Answer tokens, the closing EOS not counted."""
        return len(self.ids) - int(self.stopped)


def load_model_for_generation(name: str, *, base_model: str | None = None, dtype: str = "float32",
                              device: str | None = None, trust_remote_code: bool = False,
                              allow_pickle: bool = False):
    """(model, tokenizer) in eval mode on `device` (default: CUDA when present); LoRA adapter folders load
    onto their base model (`base_model` overrides the base named in adapter_config.json)."""
    from preftune.modeling.load import load_for_inference

    model, tokenizer = load_for_inference(name, base_model=base_model, dtype=dtype,
                                          trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.eval()
    return model, tokenizer


def prompt_text(tokenizer, prompt: str | list[dict], *, chat: bool = False) -> str:
    """The text a prompt is given to the model as: a message list through the chat template (with the
    generation prompt); a string as is, or, with `chat`, as one user message through the template when the
    tokenizer has one."""
    if isinstance(prompt, str) and not (chat and getattr(tokenizer, "chat_template", None)):
        return prompt
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if getattr(tokenizer, "chat_template", None) is None:
        raise PreftuneError("the prompt is a list of messages but the tokenizer has no chat template to render it "
                            "with; set tokenizer.chat_template or give plain-text prompts.")
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # jinja's TemplateError and whatever else a template raises
        raise PreftuneError(f"the chat template failed on a prompt ({str(e).strip() or type(e).__name__}).") from None
    return text


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Prompt ids exactly as training sees the prompt (joint tokenization with an empty answer)."""
    from preftune.data.tokenize import check_tokenizer, tokenize_texts

    check_tokenizer(tokenizer)
    ids, _ = tokenize_texts(tokenizer, text, [""])
    return ids or [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id]


def _generation_config(model, tokenizer, *, max_new_tokens: int, temperature: float, top_p: float, top_k: int,
                       pure: bool):
    from transformers import GenerationConfig

    gc = copy.deepcopy(getattr(model, "generation_config", None) or GenerationConfig())
    if pure:
        for k, v in _NEUTRAL.items():
            setattr(gc, k, v)
    eos = gc.eos_token_id if gc.eos_token_id is not None else tokenizer.eos_token_id
    gc.eos_token_id, gc.pad_token_id = eos, tokenizer.pad_token_id
    gc.max_new_tokens, gc.max_length = max_new_tokens, None
    gc.use_cache = True  # a model saved by a training run may carry use_cache=False in its config
    if temperature > 0:
        gc.do_sample, gc.temperature, gc.top_p, gc.top_k = True, temperature, top_p, top_k
    else:
        gc.do_sample, gc.temperature, gc.top_p, gc.top_k = False, None, None, None
    return gc, ({eos} if isinstance(eos, int) else set(eos))


@torch.inference_mode()
def generate_ids(model, tokenizer, prompt_ids: Sequence[list[int]], *, max_new_tokens: int = 128,
                 temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
                 batch_size: int = 16, pure: bool = False) -> list[tuple[list[int], bool]]:
    """(answer ids, stopped) per prompt, in order; temperature 0 is greedy decoding.

    Prompts are grouped by length (less padding) and left-padded, so every row's next token sits at the
    same position. The global RNG is left as it was (the seed applies inside a forked RNG).
    """
    if max_new_tokens < 1:
        raise PreftuneError(f"max_new_tokens must be at least 1, got {max_new_tokens}.")
    if temperature < 0 or not 0 < top_p <= 1:
        raise PreftuneError(f"temperature must be >= 0 and top_p in (0, 1]; got {temperature} and {top_p}.")
    gc, eos_ids = _generation_config(model, tokenizer, max_new_tokens=max_new_tokens, temperature=temperature,
                                     top_p=top_p, top_k=top_k, pure=pure)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
    results: list[tuple[list[int], bool]] = [([], False)] * len(prompt_ids)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            width = max(len(prompt_ids[i]) for i in idx)
            ids = torch.full((len(idx), width), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                p = prompt_ids[i]
                ids[row, width - len(p):] = torch.tensor(p)
                mask[row, width - len(p):] = 1
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gc)
            for row, i in enumerate(idx):
                new = out[row, width:].tolist()
                stop = next((j for j, t in enumerate(new) if t in eos_ids), None)
                results[i] = (new[:stop + 1], True) if stop is not None else (new, False)
    model.train(was_training)
    return results


def generate(model, tokenizer, prompts: Sequence[str | list[dict]], *, max_new_tokens: int = 128,
             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0, batch_size: int = 16,
             chat: bool = False, pure: bool = False) -> list[Completion]:
    """Completions of `prompts` (strings, or message lists rendered with the chat template), in order.

    temperature 0 = greedy; `top_k` 0 = off; `chat` wraps string prompts in the chat template; `pure`
    samples from the model's own distribution (see the module docstring).
    """
    ids = [encode_prompt(tokenizer, prompt_text(tokenizer, p, chat=chat)) for p in prompts]
    outs = generate_ids(model, tokenizer, ids, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                        top_k=top_k, seed=seed, batch_size=batch_size, pure=pure)
    return [Completion(tokenizer.decode(a, skip_special_tokens=True), a, stopped) for a, stopped in outs]


def read_prompts(source: str | Path, prompt_field: str = "prompt") -> list[str | list[dict]]:
    """Prompts from a file: JSONL or a JSON array of objects with a `prompt_field` (a string or a message
    list; preference and SFT data files qualify), or a .txt file with one prompt a line."""
    path = Path(source).expanduser()
    if not path.is_file():
        raise PreftuneError(f"prompt file {path} does not exist; pass a .jsonl, .json or .txt file.")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise PreftuneError(f"cannot read prompt file {path} ({e}).") from None
    if path.suffix.lower() == ".txt":
        prompts: list[Any] = [ln for ln in text.splitlines() if ln.strip()]
    else:
        try:
            rows = json.loads(text) if path.suffix.lower() == ".json" else \
                [json.loads(ln) for ln in text.splitlines() if ln.strip()]
        except json.JSONDecodeError as e:
            raise PreftuneError(f"prompt file {path} is not valid JSON{'L' if path.suffix != '.json' else ''} "
                                f"({e.msg} at line {e.lineno}).") from None
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise PreftuneError(f"prompt file {path} must hold objects with a {prompt_field!r} field.")
        missing = next((n for n, r in enumerate(rows, 1) if not isinstance(r.get(prompt_field), (str, list))), None)
        if missing is not None:
            raise PreftuneError(f"row {missing} of {path} has no {prompt_field!r} text; pass --prompt-field NAME "
                                "for another column.")
        prompts = [r[prompt_field] for r in rows]
    if not prompts:
        raise PreftuneError(f"prompt file {path} holds no prompts.")
    return prompts


def run_generate(model: str, *, prompts: Sequence[str | list[dict]], output: str | Path | None = None,
                 base_model: str | None = None, dtype: str = "float32", device: str | None = None,
                 batch_size: int = 16, **sampling: Any) -> list[dict]:
    """`preftune generate`: load `model`, complete `prompts`, write one JSON object a line to `output`
    (stdout when None) and return the rows: prompt, completion, tokens, finish_reason ("stop" | "length")."""
    loaded, tokenizer = load_model_for_generation(model, base_model=base_model, dtype=dtype, device=device)
    if sampling.get("chat") and getattr(tokenizer, "chat_template", None) is None:
        print("preftune: the tokenizer has no chat template; prompts are used as plain text", file=sys.stderr)
    outs = generate(loaded, tokenizer, prompts, batch_size=batch_size, **sampling)
    rows = [{"prompt": p, "completion": c.text, "tokens": c.num_tokens,
             "finish_reason": "stop" if c.stopped else "length"} for p, c in zip(prompts, outs)]
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if output is None:
        sys.stdout.write(lines)
    else:
        out = Path(output)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(lines, encoding="utf-8")
        except OSError as e:
            raise PreftuneError(f"cannot write {out} ({e.strerror or e}).") from None
    return rows
