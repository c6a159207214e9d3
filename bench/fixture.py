"""The benchmark fixture: a small Llama-architecture model with a real BPE tokenizer, and two preference sets.

Everything is generated locally from a seed (no downloads), and cached under `bench/fixture/<key>/` so
repeated benchmark runs reuse it. Sizes are chosen so the *shape* of the work is like a real LLM's:

- the vocabulary projection is a large share of the compute (hidden 256, vocab 8,192: the LM head is
  42% of the matmul parameters; real LLMs: Qwen2.5-0.5B ~28%, Llama-3.2-1B ~21%, Llama-3-8B ~7%; the
  benchmark's --vocab flag builds other shapes);
- the prompt-heavy set has prompts ≈ 5× the answers (320 / 64 tokens on average), the response-heavy
  set prompts ≈ answers (128 / 128), with ±25% spread so batches need padding like real data.

The text is made of pseudo-words (syllable strings with a Zipf frequency law); the tokenizer is a
byte-level BPE trained on it, so frequent words are single tokens and rare ones split, as in real text.
Token counts are exact, not estimated: each word's token count is measured once (the byte-level
pre-tokenizer splits at spaces, so counts of " word" pieces add up).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent / "fixture"


@dataclass(frozen=True)
class ModelSpec:
    """Shape of the fixture model (fp32 weights, random init). Default: a small Llama with untied embeddings
    and GQA like Llama 3; PRESETS hold real models' shapes. The tokenizer has at most 8,192 tokens whatever
    the model's vocabulary (a larger one only makes the LM head as costly as the real model's)."""

    vocab_size: int = 8192
    hidden_size: int = 256
    intermediate_size: int = 704
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 1024
    seed: int = 0
    arch: str = "llama"
    tie_word_embeddings: bool = False
    rms_norm_eps: float = 1e-6


# Real models' config values (from their config.json), random init, no download. Rotary settings (theta,
# Llama 3's frequency scaling) are left at the defaults: they change no cost.
PRESETS = {
    "qwen05": ModelSpec(arch="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                        num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                        max_position_embeddings=32768, tie_word_embeddings=True, rms_norm_eps=1e-6),
    "llama1b": ModelSpec(arch="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                         max_position_embeddings=131072, tie_word_embeddings=True, rms_norm_eps=1e-5),
    "tiny": ModelSpec(vocab_size=4096, hidden_size=64, intermediate_size=176, num_hidden_layers=2),
}
TOKENIZER_VOCAB = 8192


@dataclass(frozen=True)
class DataSpec:
    """One preference set: `n` pairs with mean prompt / answer lengths in tokens (±spread)."""

    name: str
    n: int
    prompt_tokens: int
    completion_tokens: int
    spread: float = 0.25
    seed: int = 1


SETS = {
    "prompt_heavy": dict(prompt_tokens=320, completion_tokens=64),
    "response_heavy": dict(prompt_tokens=128, completion_tokens=128),
}
# The GPU benchmark's shapes (issue 12: prompt ≈ 435 / answers ≈ 67, prompt ≈ 113 / answers ≈ 238).
GPU_SETS = {
    "prompt_heavy": dict(prompt_tokens=435, completion_tokens=67),
    "response_heavy": dict(prompt_tokens=113, completion_tokens=238),
}

_CONSONANTS = "b c d f g h j k l m n p r s t v w z ch sh th st tr".split()
_VOWELS = "a e i o u ai ea ou".split()


def _lexicon(size: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    words: set[str] = set()
    while len(words) < size:
        n_syll = rng.choice((1, 1, 2, 2, 2, 3, 3, 4))
        words.add("".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(n_syll)))
    return sorted(words)


class TextSource:
    """Draws Zipf-distributed pseudo-words; knows how many tokens each costs under a given tokenizer."""

    def __init__(self, seed: int, size: int = 12000):
        self.words = _lexicon(size, seed)
        # Zipf's law (exponent 1): word k has weight 1/k, as in natural language.
        self.weights = [1.0 / (k + 1) for k in range(len(self.words))]
        self._cost: dict[str, int] = {}

    def sentences(self, rng: random.Random, n_words: int) -> str:
        ws = rng.choices(self.words, weights=self.weights, k=n_words)
        out = []
        for i, w in enumerate(ws):
            out.append(w + ("." if i % 12 == 11 else ""))
        return " ".join(out)

    def text_with_tokens(self, tokenizer, rng: random.Random, n_tokens: int) -> str:
        """A space-separated text of about `n_tokens` tokens (exact up to one word)."""
        words, total = [], 0
        while total < n_tokens:
            w = rng.choices(self.words, weights=self.weights, k=1)[0]
            if len(words) % 12 == 11:
                w += "."
            piece = " " + w
            if piece not in self._cost:
                self._cost[piece] = len(tokenizer(piece, add_special_tokens=False)["input_ids"])
            words.append(w)
            total += self._cost[piece]
        return " ".join(words)


def _key(obj: dict) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def build_tokenizer(source: TextSource, vocab_size: int, seed: int):
    """Byte-level BPE trained on generated text; special tokens <unk> <s> </s> <pad>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(seed)
    corpus = [source.sentences(rng, 200) for _ in range(3000)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


def build_model(folder: Path, spec: ModelSpec, source: TextSource, device: str = "cpu") -> Path:
    """Save a randomly initialised Llama/Qwen2 causal LM (fp32 safetensors) and its tokenizer into `folder`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_tokenizer(source, min(spec.vocab_size, TOKENIZER_VOCAB), spec.seed)
    if len(tokenizer) > spec.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, more than the model's vocab {spec.vocab_size}")
    torch.manual_seed(spec.seed)
    config_cls, model_cls = (Qwen2Config, Qwen2ForCausalLM) if spec.arch == "qwen2" else (LlamaConfig, LlamaForCausalLM)
    extra = {"use_sliding_window": False} if spec.arch == "qwen2" else {}
    cfg = config_cls(vocab_size=spec.vocab_size, hidden_size=spec.hidden_size,
                     intermediate_size=spec.intermediate_size, num_hidden_layers=spec.num_hidden_layers,
                     num_attention_heads=spec.num_attention_heads, num_key_value_heads=spec.num_key_value_heads,
                     max_position_embeddings=spec.max_position_embeddings, bos_token_id=tokenizer.bos_token_id,
                     eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                     tie_word_embeddings=spec.tie_word_embeddings, rms_norm_eps=spec.rms_norm_eps, **extra)
    with torch.device(device):  # a 1B model initialises in seconds on a GPU, a minute on 2 CPU cores
        model = model_cls(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def make_pairs(tokenizer, source: TextSource, spec: DataSpec) -> list[dict]:
    """`spec.n` standard-format pairs {prompt, chosen, rejected} with the requested token lengths."""
    rng = random.Random(spec.seed)

    def length(mean: int) -> int:
        return max(4, round(mean * rng.uniform(1 - spec.spread, 1 + spec.spread)))

    pairs = []
    for _ in range(spec.n):
        # No "Question:/Answer:" framing: words outside the lexicon would split into single characters.
        prompt = source.text_with_tokens(tokenizer, rng, length(spec.prompt_tokens))
        chosen = " " + source.text_with_tokens(tokenizer, rng, length(spec.completion_tokens))
        rejected = " " + source.text_with_tokens(tokenizer, rng, length(spec.completion_tokens))
        pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return pairs


@dataclass
class Fixture:
    model_dir: Path
    data: dict[str, Path]      # set name -> JSONL file
    stats: dict[str, dict]     # set name -> token statistics (means, maxima)
    model: dict                # parameter counts and shape


def token_stats(tokenizer, pairs: list[dict]) -> dict:
    """Exact token counts as both trainers see them (joint prompt+answer encoding, EOS appended)."""
    p, c, r = [], [], []
    for ex in pairs:
        ids_p = tokenizer(ex["prompt"], add_special_tokens=False)["input_ids"]
        ids_c = tokenizer(ex["prompt"] + ex["chosen"], add_special_tokens=False)["input_ids"]
        ids_r = tokenizer(ex["prompt"] + ex["rejected"], add_special_tokens=False)["input_ids"]
        p.append(len(ids_p))
        c.append(len(ids_c) - len(ids_p) + 1)  # +1: the EOS both trainers append
        r.append(len(ids_r) - len(ids_p) + 1)
    n = len(pairs)
    return {"pairs": n, "prompt_mean": sum(p) / n, "chosen_mean": sum(c) / n, "rejected_mean": sum(r) / n,
            "prompt_max": max(p), "answer_max": max(max(c), max(r)),
            "longest_sequence": max(a + max(b, d) for a, b, d in zip(p, c, r)),
            "tokens_unique": sum(p) + sum(c) + sum(r),           # each prompt once + both answers
            "tokens_sequences": 2 * sum(p) + sum(c) + sum(r)}    # prompt+chosen and prompt+rejected rows


def model_info(model_dir: Path) -> dict:
    """Parameter counts from the saved config (no weights loaded)."""
    cfg = json.loads((model_dir / "config.json").read_text())
    h, i, v, n_layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h   # q,o + k,v + gate,up,down + two RMSNorms
    if cfg.get("model_type") == "qwen2":
        per_layer += h + 2 * kv                                 # q, k, v biases
    body = n_layers * per_layer + h                            # + final norm
    tied = bool(cfg.get("tie_word_embeddings"))
    return {"hidden": h, "intermediate": i, "layers": n_layers, "vocab": v, "kv_dim": kv,
            "model_type": cfg.get("model_type"), "tied_embeddings": tied,
            "params_total": body + (1 if tied else 2) * v * h, "params_body": body, "params_head": v * h,
            "params_embedding": v * h}


def build(n_pairs: dict[str, int], model: ModelSpec | None = None, root: Path = ROOT,
          log=print, sets: dict | None = None, device: str = "cpu") -> Fixture:
    """Build (or reuse) the fixture model and one JSONL per set in `n_pairs` ({set name: pairs});
    `sets` gives the sets' token shapes (default SETS, the CPU fixture's)."""
    model = model or ModelSpec()
    shapes = sets or SETS
    specs = [DataSpec(name=name, n=n, **shapes[name]) for name, n in n_pairs.items()]
    folder = root / _key({"model": asdict(model), "v": 2})
    model_dir = folder / "model"
    source = TextSource(seed=model.seed)
    if not (model_dir / "config.json").is_file():
        log(f"building fixture model in {model_dir} ...")
        build_model(model_dir, model, source, device=device)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data, stats = {}, {}
    for spec in specs:
        path = folder / f"{spec.name}-{_key(asdict(spec))}.jsonl"
        stats_path = path.with_suffix(".stats.json")
        if not path.is_file() or not stats_path.is_file():
            log(f"generating {spec.n} {spec.name} pairs ...")
            pairs = make_pairs(tokenizer, source, spec)
            stats_path.write_text(json.dumps(token_stats(tokenizer, pairs)))
            path.write_text("".join(json.dumps(p) + "\n" for p in pairs), encoding="utf-8")
        data[spec.name] = path
        stats[spec.name] = json.loads(stats_path.read_text())
    return Fixture(model_dir, data, stats, model_info(model_dir))
