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

Several answers per prompt, drawn independently of batching (`preftune pairs`, and what rounds of on-policy
training sample with):

    from preftune.generate import Sampling, sample_completions
    outs = sample_completions(model, tok, [encode_prompt(tok, "question: red cat answer:")], samples=4,
                              sampling=Sampling(max_new_tokens=64, temperature=1.0, top_p=0.95, seed=1))
    outs[0][3].text                                   # prompt 0, answer 3

`sample_completions` is the one function that samples K answers per prompt, so a faster engine (vLLM on a GPU)
can serve it later. Its own decoding loop (`sample_ids`) runs each prompt once through the model and shares the
KV cache among its K answers, drops finished answers from the batch, and stops an answer at `max_new_tokens`
or at the model's last position. Answer j of the prompt with key q is drawn from a random stream of its own,
seeded by (seed, q, j), one uniform number per token turned into a token by the inverse of the cumulative
distribution (after transformers' temperature, top-k and top-p warpers): the same key gives the same answers
whatever the batch size, the other prompts in the batch or the process that samples it (up to float rounding
of the logits, which moves a draw only when its uniform falls within rounding of a token's boundary).
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from preftune.data.tokenize import check_tokenizer, tokenize_texts
from preftune.errors import PreftuneError
from preftune.logprobs import _cache_kwarg, causal_lm
from preftune.modeling.load import load_for_inference
from preftune.outputs.files import write_output

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
    if not isinstance(model, torch.nn.Module) or tokenizer is None:
        raise PreftuneError(f"generate takes a loaded model and its tokenizer (got {type(model).__name__}); load them "
                            "with load_model_for_generation(PATH), or call run_generate(PATH, prompts=...).")
    _check_prompts(prompts)
    ids = [encode_prompt(tokenizer, prompt_text(tokenizer, p, chat=chat)) for p in prompts]
    outs = generate_ids(model, tokenizer, ids, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                        top_k=top_k, seed=seed, batch_size=batch_size, pure=pure)
    return [Completion(tokenizer.decode(a, skip_special_tokens=True), a, stopped) for a, stopped in outs]


# ------------------------------------------------------------------ K answers per prompt, independent of batching


@dataclass(frozen=True)
class Sampling:
    """How answers are drawn: temperature (0 = greedy), top_p, top_k (0 = off), at most max_new_tokens each, and
    the seed of every answer's own random stream."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise PreftuneError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}.")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise PreftuneError(f"temperature must be >= 0, top_p in (0, 1] and top_k >= 0; got {self.temperature}, "
                                f"{self.top_p} and {self.top_k}.")


def row_seed(seed: int, key: int, sample: int) -> int:
    """The seed of answer `sample` of the prompt with `key`: a hash, so nearby seeds give unrelated streams."""
    digest = hashlib.blake2b(f"{seed}:{key}:{sample}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _uniforms(seeds: Sequence[int], n: int) -> torch.Tensor:
    """[rows, n] float64: uniform t of each row's stream is the one its token t is drawn with."""
    out = torch.empty(len(seeds), n, dtype=torch.float64)
    gen = torch.Generator()
    for r, s in enumerate(seeds):
        gen.manual_seed(s)
        out[r] = torch.rand(n, generator=gen, dtype=torch.float64)
    return out


def _warpers(sampling: Sampling):
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    procs = [TemperatureLogitsWarper(float(sampling.temperature))] if sampling.temperature not in (0, 1) else []
    if sampling.top_k > 0:
        procs.append(TopKLogitsWarper(sampling.top_k))
    if sampling.top_p < 1:
        procs.append(TopPLogitsWarper(sampling.top_p))
    return LogitsProcessorList(procs)


def pick_tokens(logits: torch.Tensor, uniforms: torch.Tensor, sampling: Sampling, warpers=None) -> torch.Tensor:
    """[rows] token ids from [rows, vocab] logits: argmax at temperature 0, else the token whose interval of the
    cumulative distribution (in vocabulary order, after the warpers) holds the row's uniform number.

    Vocabulary order, not sorted by probability: two tokens of nearly equal probability swapping places under
    float rounding would otherwise move every draw between them."""
    if sampling.temperature == 0:
        return logits.argmax(-1)
    warpers = _warpers(sampling) if warpers is None else warpers
    scores = warpers(None, logits.float())  # these warpers never read the input ids
    cdf = torch.softmax(scores.double(), dim=-1).cumsum(-1)
    target = (uniforms.to(cdf.device) * cdf[:, -1]).unsqueeze(-1)
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_(max=cdf.shape[-1] - 1)


def stop_ids(model, tokenizer) -> set[int]:
    """The tokens that end an answer: the model's generation config's EOS ids, else the tokenizer's EOS."""
    gc = getattr(model, "generation_config", None)
    eos = getattr(gc, "eos_token_id", None)
    eos = tokenizer.eos_token_id if eos is None else eos
    return {eos} if isinstance(eos, int) else set(eos)


def max_positions(model) -> int | None:
    """How many positions the model has (prompt + answer must fit), None when its config does not say."""
    n = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return n if isinstance(n, int) and n > 0 else None


def _step(lm, cache_kwarg: str, cache, **inputs):
    """(last position's logits, cache) of one forward of `lm` (the *ForCausalLM, LoRA layers in place)."""
    # Only the last position's logits are needed; a prompt's full [length, vocab] logits can take gigabytes.
    if "logits_to_keep" in inspect.signature(lm.forward).parameters:
        inputs["logits_to_keep"] = 1
    if cache is not None:
        inputs[cache_kwarg] = cache
    out = lm(**inputs, use_cache=True)
    return out.logits[:, -1], (out.cache if hasattr(out, "cache") else out.past_key_values)


@torch.inference_mode()
def sample_ids(model, prompt_ids: Sequence[list[int]], *, samples: int = 1, sampling: Sampling = Sampling(),
               eos_ids: set[int], pad_id: int, keys: Sequence[int] | None = None, batch_size: int = 32,
               limit: int | None = None) -> list[list[tuple[list[int], bool]]]:
    """[prompt][answer] → (answer ids, stopped): `samples` answers per prompt, EOS last when the answer stopped
    by itself, else cut at `max_new_tokens` or at `limit` positions (prompt + answer). Prompts that leave no
    room under `limit` get no answers ([]).

    `batch_size` counts answers decoded together (prompts per batch: batch_size // samples, at least one).
    `keys` name the prompts' random streams (default: their positions in `prompt_ids`)."""
    sampling.check()
    keys = list(range(len(prompt_ids))) if keys is None else list(keys)
    if len(keys) != len(prompt_ids) or len(set(keys)) != len(keys):
        raise PreftuneError("sample_ids needs one distinct key per prompt.")
    out: list[list[tuple[list[int], bool]]] = [[] for _ in prompt_ids]
    room = [sampling.max_new_tokens if limit is None else min(sampling.max_new_tokens, limit - len(p))
            for p in prompt_ids]
    order = sorted((i for i in range(len(prompt_ids)) if room[i] > 0), key=lambda i: -len(prompt_ids[i]))
    per = max(1, batch_size // samples)
    was_training = model.training
    model.eval()
    try:
        for s in range(0, len(order), per):
            idx = order[s:s + per]
            answers = _decode(model, [prompt_ids[i] for i in idx], [keys[i] for i in idx], [room[i] for i in idx],
                              samples, sampling, eos_ids, pad_id)
            for n, i in enumerate(idx):
                out[i] = answers[n * samples:(n + 1) * samples]
    finally:
        model.train(was_training)
    return out


def _decode(model, prompts: list[list[int]], keys: list[int], room: list[int], k: int, sampling: Sampling,
            eos_ids: set[int], pad_id: int) -> list[tuple[list[int], bool]]:
    """One batch: prefill the prompts once, repeat their cache k times, decode until every answer ended."""
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):  # left padding: every row's next token sits at the same cache slot
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    lm = causal_lm(model)
    kwarg = _cache_kwarg(lm)
    mask = mask.to(device)
    logits, cache = _step(lm, kwarg, None, input_ids=ids.to(device), attention_mask=mask,
                          position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    if k > 1:
        cache.batch_repeat_interleave(k)
        logits, mask = logits.repeat_interleave(k, 0), mask.repeat_interleave(k, 0)
    position = torch.tensor([len(p) for p in prompts], device=device).repeat_interleave(k)
    caps = [r for r in room for _ in range(k)]
    uniforms = _uniforms([row_seed(sampling.seed, key, j) for key in keys for j in range(k)], sampling.max_new_tokens)
    warpers = _warpers(sampling)
    answers: list[list[int]] = [[] for _ in caps]
    stopped = [False] * len(caps)
    active = torch.arange(len(caps))
    for t in range(sampling.max_new_tokens):
        tokens = pick_tokens(logits, uniforms[active, t], sampling, warpers)
        keep = []
        for a, (row, tok) in enumerate(zip(active.tolist(), tokens.tolist())):
            answers[row].append(tok)
            stopped[row] = tok in eos_ids
            if not stopped[row] and len(answers[row]) < caps[row]:
                keep.append(a)
        if not keep:
            break
        if len(keep) < len(active):  # finished answers leave the batch, and their cache rows with them
            sel = torch.tensor(keep, device=device)
            cache.batch_select_indices(sel)
            mask, tokens, position, active = mask[sel], tokens[sel], position[sel], active[sel.cpu()]
        mask = torch.cat([mask, mask.new_ones((len(keep), 1))], dim=1)
        logits, cache = _step(lm, kwarg, cache, input_ids=tokens[:, None], attention_mask=mask,
                              position_ids=position[:, None])
        position = position + 1
    return list(zip(answers, stopped))


def sample_completions(model, tokenizer, prompt_ids: Sequence[list[int]], *, samples: int,
                       sampling: Sampling = Sampling(), keys: Sequence[int] | None = None,
                       batch_size: int = 32) -> list[list[Completion]]:
    """`samples` completions of each prompt (ids from `encode_prompt`), drawn as `sample_ids` does: the same
    (seed, key, answer number) gives the same completion in any batch. A prompt that fills the model's
    positions gets none."""
    raw = sample_ids(model, prompt_ids, samples=samples, sampling=sampling, eos_ids=stop_ids(model, tokenizer),
                     pad_id=tokenizer.pad_token_id, keys=keys, batch_size=batch_size, limit=max_positions(model))
    return [[Completion(tokenizer.decode(a, skip_special_tokens=True), a, stopped) for a, stopped in answers]
            for answers in raw]
def _check_prompts(prompts: Any) -> None:
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not all(
            isinstance(p, (str, list)) for p in prompts):
        raise PreftuneError("prompts must be a list of prompts, each a string or a list of chat messages (got "
                            f"{type(prompts).__name__}).")


def run_generate(model: str, *, prompts: Sequence[str | list[dict]], output: str | Path | None = None,
                 base_model: str | None = None, dtype: str = "float32", device: str | None = None,
                 batch_size: int = 16, **sampling: Any) -> list[dict]:
    """`preftune generate`: load `model`, complete `prompts`, write one JSON object a line to `output`
    (stdout when None; a file is written whole, never through a link) and return the rows: prompt,
    completion, tokens, finish_reason ("stop" | "length")."""
    for name, value in (("model", model), ("base_model", base_model), ("output", output)):
        if not isinstance(value, (str, os.PathLike)) and (value is not None or name == "model"):
            raise PreftuneError(f"run_generate: {name} must be a path (or a hub name), got {type(value).__name__}.")
    _check_prompts(prompts)
    loaded, tokenizer = load_model_for_generation(str(model), base_model=base_model, dtype=dtype, device=device)
    if sampling.get("chat") and getattr(tokenizer, "chat_template", None) is None:
        print("preftune: the tokenizer has no chat template; prompts are used as plain text", file=sys.stderr)
    outs = generate(loaded, tokenizer, prompts, batch_size=batch_size, **sampling)
    rows = [{"prompt": p, "completion": c.text, "tokens": c.num_tokens,
             "finish_reason": "stop" if c.stopped else "length"} for p, c in zip(prompts, outs)]
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if output is None:
        sys.stdout.write(lines)
    else:
        write_output(output, lines, "the completions")
    return rows
