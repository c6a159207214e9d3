"""Online DPO (`preftune train --online`, TRL's OnlineDPOTrainer semantics): the pairs of every optimizer step are
new, sampled from the policy as it is at that step and judged, so the model always learns from its own answers.

    from preftune import TrainConfig, train
    train(TrainConfig(model="runs/sft/final", online=True, prompts="prompts.jsonl", judge="my_judges:score",
                      output_dir="runs/online", max_steps=200, beta=0.1, learning_rate=5e-7))

`OnlineBatches` is such a run's training data: it has a split's fields (recipe_setup.load_data returns it), its
`pairs` being the prompts (with no answers), so the run's batch order, epochs and steps are drawn over them exactly
as over pairs and its resume check compares their token ids; and the recipe asks it for each step's pairs
(`step_pairs`). At each step, for each prompt of this process's
micro-batches: two answers sampled from the current weights (`generate.sample_completions`; answer j of the
prompt at step s drawn from its own random stream, keyed by (seed, s, prompt), so a resumed run draws the same
ones), judged (`onpolicy.judges`, any of the four kinds; `missing_eos_penalty` as `pairs`), and the better one
chosen (`onpolicy.select`, best-worst). A tie, or a prompt whose two answers are the same, makes no pair: TRL
trains on a tie as if the first answer won, which teaches an arbitrary preference. A micro-batch left without a
pair runs as a filler (its loss times 0), so every process still runs the same forwards and backwards.

The answers are trained on as the exact token ids drawn (EOS last when the answer stopped), after the prompt as
training encodes it, cut from the left to max_prompt_length. The reference is the starting model, scored live
(a frozen copy, or the base under LoRA adapters): precomputed log-probs cannot exist for pairs that are new
each step. Each logged line adds `online/pairs` and `online/ties` (the global batch's, summed over the processes
like every logged figure) and `online/sample_s` and `online/judge_s` (seconds over the logging window, the mean
of the processes, which sample and judge their shares side by side).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from preftune.config import TrainConfig
from preftune.data.batching import Share
from preftune.data.tokenize import TokenizedPair
from preftune.errors import PreftuneError
from preftune.generate import Sampling
from preftune.onpolicy.pairs import encode_prompts, judge_candidates, open_judge, sample_candidates
from preftune.onpolicy.prompts import Prompt, load_prompts
from preftune.onpolicy.select import select_pairs

ANSWERS = 2  # per prompt, as TRL's online DPO


class OnlineBatches:
    """Each step's pairs, sampled from the policy and judged (see the module docstring)."""

    example = entry = None  # a split's fields (data/splits.Split): no example to show, no cache entry to keep

    def __init__(self, cfg: TrainConfig, tokenizer, *, task: str, engine: Any):
        if task == "sft":
            raise PreftuneError("--online samples preference pairs; it is an option of `preftune train`, not sft.")
        if task != "dpo":
            raise PreftuneError(f"--online makes pairs of two answers; the loss {cfg.loss!r} reads unpaired examples, "
                                "so train it on --data, or pick a paired loss.")
        if engine.sharded:
            raise PreftuneError("--online samples from the whole model on every process; FSDP2 and ZeRO-3 shard it, "
                                "so run it on one process or under DDP.")
        self.cfg, self.tokenizer = cfg, tokenizer
        self.judge = open_judge(cfg, device=str(engine.device))
        found = load_prompts(cfg.prompts, prompt_field=cfg.prompt_field)
        self.prompts = found.prompts
        full = encode_prompts(tokenizer, self.prompts)
        self.ids = [ids[-cfg.max_prompt_length:] for ids in full]  # from the left, as training cuts a prompt
        cut = sum(len(ids) > cfg.max_prompt_length for ids in full)
        lines = [f"online DPO: {len(self.prompts):,} prompts from {cfg.prompts} ({found.how}); {ANSWERS} answers per "
                 f"prompt sampled each step (temperature {cfg.temperature:g}, at most {cfg.max_new_tokens} tokens), "
                 f"judged by {self.judge.name}; reference: the starting model ({cfg.reference})"]
        if cut:
            lines.append(f"{cut:,} prompts are longer than max_prompt_length {cfg.max_prompt_length} and were cut "
                         "from the left")
        # The prompts stand in for the pairs wherever the run reads its data: order, steps, vocabulary, identity.
        self.pairs = [TokenizedPair(ids, [], [], p.index) for ids, p in zip(self.ids, self.prompts)]
        self.summary = "\n".join(lines)
        self.info = {"prompts": len(self.prompts), "source": str(cfg.prompts)}
        self.sampling = Sampling(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                                 top_k=cfg.top_k, seed=cfg.seed)
        self.eos = tokenizer.eos_token_id
        self.window = {"online/pairs": 0, "online/ties": 0, "online/sample_s": 0.0, "online/judge_s": 0.0}

    def step_pairs(self, model, step: int, share: Share) -> tuple[list[TokenizedPair], Share]:
        """This step's pairs and this process's share of them (micro-batches, fillers), from its share of the
        prompts."""
        micro, fillers = share
        asked = [i for m in micro for i in m]
        # The answers' random streams are keyed by (step, prompt): another step draws other answers of a prompt.
        keyed = [Prompt(step * len(self.prompts) + i, self.prompts[i].value, self.prompts[i].where) for i in asked]
        t0 = time.perf_counter()
        cands = sample_candidates(model, self.tokenizer, keyed, [self.ids[i] for i in asked], samples=ANSWERS,
                                  sampling=self.sampling, batch_size=max(ANSWERS, ANSWERS * len(asked)))
        t1 = time.perf_counter()
        scores = judge_candidates(self.judge, cands, missing_eos_penalty=self.cfg.missing_eos_penalty)
        self.window["online/sample_s"] += t1 - t0
        self.window["online/judge_s"] += time.perf_counter() - t1
        made = dict(zip(asked, zip(cands, scores)))
        out: list[TokenizedPair] = []
        new_micro, new_fillers = [], []
        for m in micro:
            kept = [self._pair(i, *made[i], out) for i in m]
            kept = [k for k in kept if k is not None]
            if kept:
                new_micro.append(kept)
            else:  # nothing to learn from: a filler keeps this process's forwards in step with the others'
                new_fillers.append(self._filler(m[0], out))
        new_fillers += [self._filler(m[0], out) for m in fillers]
        return out, Share(new_micro, new_fillers)

    def _pair(self, i: int, cand: Any, scores: Sequence[float], out: list[TokenizedPair]) -> int | None:
        sel = select_pairs(scores, "best-worst")
        self.window["online/ties"] += sel.ties
        if not sel.pairs:
            return None
        hi, lo = sel.pairs[0]
        out.append(TokenizedPair(self.ids[i], cand.answers[hi].ids, cand.answers[lo].ids, self.prompts[i].index))
        self.window["online/pairs"] += 1
        return len(out) - 1

    def _filler(self, i: int, out: list[TokenizedPair]) -> list[int]:
        out.append(TokenizedPair(self.ids[i], [self.eos], [self.eos], self.prompts[i].index))
        return [len(out) - 1]

    def metrics(self, reduce_sum: Callable[[list[float]], list[float]]) -> dict[str, float]:
        """The logging window's counts summed over the processes and its seconds averaged over them (then reset);
        `reduce_sum`: Engine.reduce_sum (collective: every process calls it at the same step)."""
        pairs, ties, sample_s, judge_s, processes = reduce_sum([
            float(self.window["online/pairs"]), float(self.window["online/ties"]), self.window["online/sample_s"],
            self.window["online/judge_s"], 1.0])
        self.window = {k: type(v)() for k, v in self.window.items()}
        return {"online/pairs": int(pairs), "online/ties": int(ties), "online/sample_s": sample_s / processes,
                "online/judge_s": judge_s / processes}
