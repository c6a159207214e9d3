"""A reward model as a judge: a transformers sequence classifier with one output, scoring (prompt, answer) texts
in batches (see `preftune.onpolicy.judges`, kind (c))."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification

from preftune.errors import PreftuneError
from preftune.modeling.load import DTYPES, check_loading_info, load_tokenizer, resolve_model_path
from preftune.modeling.reference import model_identity
from preftune.onpolicy.judges import Group, Judge


def check_reward_model(name: str, *, trust_remote_code: bool = False, allow_pickle: bool = False) -> str:
    """The resolved path of a reward model, refused in one sentence unless its config has exactly one output."""
    path = resolve_model_path(name, allow_pickle)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise PreftuneError(f"cannot read the reward model's config in {name} ({str(e).splitlines()[0]}).") from None
    archs = getattr(config, "architectures", None) or []
    if config.num_labels != 1:
        lm = any(a.endswith("ForCausalLM") for a in archs)
        what = "is a causal language model" if lm else f"has {config.num_labels} outputs (num_labels)"
        raise PreftuneError(f"the reward model {name} {what}; a reward model is a sequence classifier with one "
                            "output per answer (num_labels 1).")
    return path


class RewardModelJudge(Judge):
    """Scores with `AutoModelForSequenceClassification` (one output), `batch_size` texts a forward."""

    kind = "reward-model"

    def __init__(self, name: str, *, device: str | torch.device | None = None, dtype: str = "float32",
                 batch_size: int = 16, trust_remote_code: bool = False, allow_pickle: bool = False):
        self.path = check_reward_model(name, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
        self.name, self.batch_size, self.dtype = name, batch_size, dtype
        self.trust_remote_code, self.allow_pickle = trust_remote_code, allow_pickle
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model: Any = None  # loaded at the first score: a rerun with nothing left to judge never loads it
        self.truncated = 0  # texts cut from the left to max_length

    def _load(self) -> None:
        try:
            model, info = AutoModelForSequenceClassification.from_pretrained(
                self.path, dtype=DTYPES[self.dtype], trust_remote_code=self.trust_remote_code,
                use_safetensors=not self.allow_pickle, output_loading_info=True)
        except (OSError, ValueError, RuntimeError) as e:
            raise PreftuneError(f"could not load the reward model {self.name} ({str(e).splitlines()[0]}).") from None
        check_loading_info(model, info, self.name, None)
        self.tokenizer = load_tokenizer(self.path, trust_remote_code=self.trust_remote_code)
        if model.config.pad_token_id is None:  # batches are padded; the classifier reads the last real token
            model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model = model.to(self.device).eval()
        positions = getattr(model.config, "max_position_embeddings", None) or 1 << 30
        self.max_length = min(positions, getattr(self.tokenizer, "model_max_length", positions) or positions)

    def identity(self) -> dict[str, Any]:
        return {"kind": self.kind, "model": model_identity(self.path)}

    def text(self, prompt: Any, answer: str) -> str:
        """(prompt, answer) as the reward model reads it: its chat template's user and assistant turns."""
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
            return tok.apply_chat_template(turns + [{"role": "assistant", "content": answer}], tokenize=False)
        if not isinstance(prompt, str):
            raise PreftuneError(f"the reward model {self.name} has no chat template to show it chat-message "
                                "prompts; give it one (tokenizer.chat_template) or use plain-text prompts.")
        return prompt + answer

    def encode(self, text: str) -> list[int]:
        # A chat template writes the BOS token itself; adding special tokens again would double it.
        bos = self.tokenizer.bos_token
        ids = self.tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"]
        if len(ids) > self.max_length:
            self.truncated += 1
            ids = ids[len(ids) - self.max_length:]  # keep the answer's end, where the reward is read
        return ids

    @torch.inference_mode()
    def score_texts(self, texts: Sequence[str]) -> list[float]:
        if self.model is None:
            self._load()
        ids = [self.encode(t) for t in texts]
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        out = [0.0] * len(ids)
        pad = self.model.config.pad_token_id
        for s in range(0, len(order), self.batch_size):
            idx = order[s:s + self.batch_size]
            width = max(len(ids[i]) for i in idx)
            batch = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):  # right padding: every version of the classifiers reads it right
                batch[row, :len(ids[i])] = torch.tensor(ids[i])
                mask[row, :len(ids[i])] = 1
            logits = self.model(input_ids=batch.to(self.device), attention_mask=mask.to(self.device)).logits
            for row, i in enumerate(idx):
                out[i] = float(logits[row, 0])
        return out

    def score(self, groups: Sequence[Group]) -> list[list[float]]:
        if self.model is None:
            self._load()
        texts = [self.text(g.prompt, a) for g in groups for a in g.answers]
        flat = self.score_texts(texts)
        out, at = [], 0
        for g in groups:
            out.append(flat[at:at + len(g.answers)])
            at += len(g.answers)
        for g, row in zip(groups, out):
            if any(x != x or x in (float("inf"), float("-inf")) for x in row):
                raise PreftuneError(f"the reward model {self.name} gave a non-finite score to an answer to the "
                                    f"prompt at {g.where}; check its weights and --dtype.")
        return out
