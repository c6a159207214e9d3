"""The demo's SFT base: a word-level tokenizer and a tiny Llama, trained with `preftune sft` on synthetic news.

`build_base` is the whole recipe, deterministic for a seed:

    generate articles -> train a tokenizer on them -> initialise a tiny Llama from a config
    -> `preftune sft` on news briefs (the lead sentence alone) with their reference summaries
    -> `preftune sft` on full articles with the mixture of good and bad summaries (`news.build_sft_records`)

The briefs stage is a curriculum step: a model this small learns to find and copy the facts (an
"induction" pattern: after "plant", write what followed "plant" in the article) in ~500 steps of 32 on a
40-token lead, while on full articles, where the lead is buried in 140 tokens of filler with distractors,
it had not started copying numbers after 2,700 steps of 16. Once it can copy, the full articles teach it
the newsroom's mixture of styles.

The build takes about 11 minutes on 2 CPU cores (600 + 2,500 steps), twice the demo's budget, so its
result is committed in `examples/news_demo/assets/base` (safetensors and tokenizer files, 1.6 MB; not
in the preftune wheel) and the demo starts from there; `--from-scratch` runs `build_base` first. Rebuild
the committed copy, from the repository root, with

    python -m examples.news_demo.base --output examples/news_demo/assets/base
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from examples.news_demo import news
from preftune.errors import PreftuneError

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)
ASSETS_BASE = Path(__file__).parent / "assets" / "base"
# What a model folder needs; everything else the SFT run writes (metrics, config) stays in its run folder.
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
               "tokenizer_config.json", "special_tokens_map.json")

# The base's shape: 0.3M parameters besides a 695-word embedding; small enough to train on a laptop CPU,
# and three layers, since copying a fact takes two attention steps (find the word, read the next one).
MODEL_SHAPE = {
    "hidden_size": 96,
    "intermediate_size": 256,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 512,
}


@dataclass(frozen=True)
class BaseRecipe:
    """How the shipped base is built; `quick()` is the shortened build the tests run."""

    n_articles: int = 20000
    brief_steps: int = 600         # stage 1: lead-only prompts, reference summaries
    brief_learning_rate: float = 3e-3
    full_steps: int = 2500         # stage 2: full articles, the mixture of styles
    full_learning_rate: float = 1e-3
    batch_size: int = 32
    seed: int = 0

    @classmethod
    def quick(cls) -> BaseRecipe:
        return cls(n_articles=200, brief_steps=12, full_steps=4, batch_size=8)


def corpus(articles: Iterable[news.Article]) -> list[str]:
    """The tokenizer's training text: the generator's lexicon, then every prompt, reference and bad summary."""
    rng = random.Random(0)
    texts = news.lexicon()
    for art in articles:
        texts.append(news.make_prompt(art))
        texts.append(art.reference)
        texts.extend(news.bad_summary(art, kind, rng) for kind in news.BAD_KINDS)
    return texts


def build_tokenizer(texts: Iterable[str]):
    """A word-level `PreTrainedTokenizerFast` over `texts`: words and punctuation marks are tokens.

    Words rather than sub-words keep every name and number a single token, which a 0.4M-parameter model
    copies from the article far more reliably than a run of pieces. The generator's vocabulary is closed
    (`news.lexicon`), so nothing the demo writes is unknown; `<unk>` is there for text typed by hand.
    Encoding adds BOS in front, as the models are trained to see it first.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    # WordPiece's decoder joins words with spaces and, with cleanup, glues "." and "," back on.
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok.train_from_iterator(texts, trainer=trainers.WordLevelTrainer(special_tokens=list(SPECIAL_TOKENS),
                                                                     show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B",
                                                       special_tokens=[(BOS, tok.token_to_id(BOS))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, unk_token=UNK, bos_token=BOS,
                                   eos_token=EOS, padding_side="left", model_max_length=512)


def build_model(tokenizer, seed: int = 0, **shape):
    """A randomly initialised tiny `LlamaForCausalLM` for `tokenizer` (tied embeddings), deterministic in seed."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **{**MODEL_SHAPE, **shape})
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def write_jsonl(path: Path, rows: Iterable[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def build_base(output_dir: str | Path, recipe: BaseRecipe = BaseRecipe(), *, work_dir: str | Path | None = None,
               progress: bool = True, say: Callable[[str], None] = print) -> Path:
    """Build the SFT base into `output_dir` (model + tokenizer files only) and return it.

    Intermediate files (the initial model, the SFT data, the two SFT run folders) go to `work_dir`, by
    default a `<output_dir>_work` folder beside `output_dir`.
    """
    from preftune import TrainConfig, sft

    out = Path(output_dir)
    work = Path(work_dir) if work_dir is not None else out.parent / f"{out.name}_work"
    t0 = time.time()
    articles = news.generate_articles(recipe.n_articles, seed=recipe.seed, split="train")
    tokenizer = build_tokenizer(corpus(articles))
    model = build_model(tokenizer, seed=recipe.seed)
    init_dir = work / "init"
    model.save_pretrained(init_dir, safe_serialization=True)
    tokenizer.save_pretrained(init_dir)
    n_params = sum(p.numel() for p in model.parameters())
    say(f"base: tokenizer of {len(tokenizer)} words, Llama of {n_params / 1e6:.2f}M parameters")

    briefs = write_jsonl(work / "briefs.jsonl", ({"prompt": news.make_prompt(a, paragraphs=1),
                                                 "completion": " " + a.reference} for a in articles))
    full = write_jsonl(work / "sft.jsonl", ({"prompt": r["prompt"], "completion": r["completion"]}
                                            for r in news.build_sft_records(articles, seed=recipe.seed)))
    start, losses = init_dir, {}
    for stage, data, steps, lr in (("briefs", briefs, recipe.brief_steps, recipe.brief_learning_rate),
                                   ("full", full, recipe.full_steps, recipe.full_learning_rate)):
        say(f"base: preftune sft on {stage} ({recipe.n_articles:,} articles), {steps} steps of {recipe.batch_size}")
        res = sft(TrainConfig(
            model=str(start), data=str(data), output_dir=str(work / f"sft_{stage}"), max_steps=steps,
            batch_size=recipe.batch_size, learning_rate=lr, lr_scheduler="cosine", warmup_ratio=0.05,
            adam_beta2=0.99, max_length=256, max_prompt_length=224, seed=recipe.seed,
            logging_steps=max(1, steps // 20), progress=progress, overwrite=True))
        if res.interrupted:  # a half-trained base must not ship
            raise PreftuneError(f"the base's SFT stage {stage!r} stopped after {res.steps} of {steps} steps; "
                                "run the build again.")
        start, losses[stage] = res.final_dir, res.train_metrics.get("loss")
    out.mkdir(parents=True, exist_ok=True)
    for name in MODEL_FILES:
        if (start / name).exists():
            shutil.copy2(start / name, out / name)
    (out / "recipe.json").write_text(json.dumps(asdict(recipe), indent=2) + "\n")
    say(f"base: built {out} in {time.time() - t0:.0f}s (final SFT losses: {losses})")
    return out


def check_base(path: str | Path) -> Path:
    """`path` if it holds a model and a tokenizer, else a PreftuneError saying how to build one."""
    p = Path(path)
    missing = [n for n in ("config.json", "model.safetensors", "tokenizer.json") if not (p / n).is_file()]
    if missing:
        raise PreftuneError(
            f"the demo's base model in {p} is missing {', '.join(missing)}; rebuild it with "
            f"`python -m examples.news_demo.base --output {p}` or run the demo with --from-scratch.")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.news_demo.base", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=str(ASSETS_BASE), help="folder for the SFT base (model + tokenizer)")
    parser.add_argument("--work-dir", default=None, help="folder for intermediate files (default: next to --output)")
    parser.add_argument("--quick", action="store_true", help="the shortened build the tests use")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    recipe = BaseRecipe.quick() if args.quick else BaseRecipe()
    if args.seed != recipe.seed:
        recipe = BaseRecipe(**{**asdict(recipe), "seed": args.seed})
    try:
        build_base(args.output, recipe, work_dir=args.work_dir)
    except PreftuneError as e:
        print(f"error: {e}")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
