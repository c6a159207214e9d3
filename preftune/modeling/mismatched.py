"""KTO's mismatched pairs: log π/π_ref of prompts paired with other examples' answers, for its reference point.

KTO (Ethayarajh et al. 2024, arXiv 2402.01306, Section 4) moves every example's reward against z0, an estimate
of KL(π ‖ π_ref) from answers that do not belong to their prompt: z0 = max(0, mean_j log π(y'_j|x_j) −
log π_ref(y'_j|x_j)). As in TRL, y'_j is the answer of the example before j (cyclically), here in the *global*
batch: its micro-batches of every process, in the order training cuts them (`TrainOrder.global_batch`).
So z0 is one number per optimizer step whatever the split into micro-batches and processes (TRL estimates one
per micro-batch and averages over processes; the two agree when the global batch is one micro-batch). A global
batch of one example pairs it with the next example of the data set. The eval split pairs each of its examples,
in order, with the one before.

The policy's side is scored before the step's micro-batches (no gradient: z0 is detached), split across the
processes (`scoring.score`: each scores a share, every process gets all values), so every process computes the
same z0. The reference's side is scored the same way from a live reference, or looked up in a table scored once
before training (`PrecomputedPairs`): the order is a pure function of the seed, so the run knows its pairs up
front. A mismatched example is the prompt's ids followed by the other answer's ids, cut to `max_length`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from preftune.data.batching import TrainOrder
from preftune.data.tokenize import TokenizedPair
from preftune.logprobs import handle_model, statistics_only
from preftune.modeling.precomputed import Placement, _everywhere, without_adapters
from preftune.scoring import score


def mismatched_positions(order: Sequence[int], n: int) -> np.ndarray:
    """[k, 2] (prompt position, answer position): each example of `order` with the answer of the one before it
    (the first with the last's); a lone example with the next example of the `n` in its split."""
    order = np.asarray(order, dtype=np.int64)
    if len(order) == 1:
        return np.array([[order[0], (order[0] + 1) % n]], dtype=np.int64)
    return np.stack([order, np.roll(order, 1)], axis=1)


def mismatched_examples(pairs: Sequence[TokenizedPair], positions: np.ndarray, max_length: int) -> list[TokenizedPair]:
    """The examples prompt(p) + answer(c) for each row (p, c) of `positions`, the answer cut to fit `max_length`."""
    out = []
    for p, c in positions.tolist():
        prompt = pairs[p].prompt_ids
        out.append(TokenizedPair(prompt, pairs[c].chosen_ids[:max(1, max_length - len(prompt))], None, -1))
    return out


def score_answers(handle: torch.nn.Module, examples: Sequence[TokenizedPair], *, reference: bool, pad_id: int,
                  batch_size: int, autocast: Any, placement: Placement) -> torch.Tensor:
    """Summed answer log-probs [k] under `handle` (a reference's handle runs with LoRA adapters off), in eval mode
    without gradients, split across the processes; every process returns all of them."""
    adapters = without_adapters(handle_model(handle)) if reference else contextlib.nullcontext()
    with adapters, statistics_only(handle, frozenset()):
        out = score(handle, examples, pad_id=pad_id, batch_size=batch_size, autocast=autocast,
                    rank=placement.rank, world=placement.world, device=placement.device)
    return out.chosen_logps.double()


class PrecomputedPairs:
    """Reference log-probs of mismatched pairs, looked up by (prompt position, answer position)."""

    def __init__(self, prompt: np.ndarray, answer: np.ndarray, logps: torch.Tensor):
        self.values = {(int(p), int(c)): float(v) for p, c, v in zip(prompt, answer, logps.tolist())}

    def __call__(self, positions: np.ndarray) -> torch.Tensor:
        missing = [tuple(pc) for pc in positions.tolist() if tuple(pc) not in self.values]
        if missing:
            raise RuntimeError(f"reference log-probs of mismatched pairs {missing[:4]} were not precomputed")
        return torch.tensor([self.values[(p, c)] for p, c in positions.tolist()], dtype=torch.float64)


def precompute_pairs(handle: torch.nn.Module, pairs: Sequence[TokenizedPair], positions: np.ndarray, *,
                     cache_file: Path, max_length: int, save: bool, placement: Placement,
                     say: Callable[[str], None], **score_kw: Any) -> PrecomputedPairs:
    """The reference's log-probs of the mismatched pairs `positions` ([k, 2]): those `cache_file` holds, the rest
    scored (every process a share) and added to it (by the main process, when `save`)."""
    positions = np.unique(positions, axis=0)
    known: dict[str, torch.Tensor] = {}
    if cache_file.is_file():
        try:
            known = load_file(str(cache_file))
            if set(known) != {"prompt", "answer", "logps"} or not torch.isfinite(known["logps"]).all():
                raise ValueError("unexpected contents")
        except Exception as e:  # a truncated or foreign file
            say(f"reference cache {cache_file.name} is unusable ({str(e).splitlines()[0]}); computing it again")
            known = {}
    if not _everywhere(bool(known), placement):
        known = {}
    known = known or {"prompt": torch.zeros(0, dtype=torch.int64), "answer": torch.zeros(0, dtype=torch.int64),
                      "logps": torch.zeros(0, dtype=torch.float64)}
    have = {(int(p), int(c)) for p, c in zip(known["prompt"].tolist(), known["answer"].tolist())}
    todo = np.array([pc for pc in positions.tolist() if tuple(pc) not in have], dtype=np.int64).reshape(-1, 2)
    if not len(todo):
        return PrecomputedPairs(known["prompt"].numpy(), known["answer"].numpy(), known["logps"])
    logps = score_answers(handle, mismatched_examples(pairs, todo, max_length), reference=True,
                          placement=placement, **score_kw)
    tensors = {"prompt": torch.cat([known["prompt"], torch.from_numpy(todo[:, 0])]),
               "answer": torch.cat([known["answer"], torch.from_numpy(todo[:, 1])]),
               "logps": torch.cat([known["logps"].double(), logps])}
    if save:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(".tmp-" + cache_file.name)  # the run folder removes `.tmp-*` after a failed save
        save_file(tensors, str(tmp))
        tmp.replace(cache_file)
    return PrecomputedPairs(tensors["prompt"].numpy(), tensors["answer"].numpy(), tensors["logps"])


class MismatchedPairs:
    """Σ_j log π(y'_j|x_j) − log π_ref(y'_j|x_j) over a step's global batch (`step`) or the eval split (`evaluation`),
    with the count, the same on every process. `policy(examples)` and `reference(split, positions, examples)` give
    the [k] summed log-probs."""

    def __init__(self, splits: dict[str, Sequence[TokenizedPair] | None], order: TrainOrder, *, max_length: int,
                 policy: Callable[[list[TokenizedPair]], torch.Tensor],
                 reference: Callable[[str, np.ndarray, list[TokenizedPair]], torch.Tensor]):
        self.splits, self.order, self.max_length = splits, order, max_length
        self.policy, self.reference = policy, reference

    @staticmethod
    def positions_of(pairs: Sequence[TokenizedPair], order: TrainOrder, split: str, step: int | None) -> np.ndarray:
        """[k, 2] mismatched (prompt, answer) positions of a train step's global batch, or of the eval split."""
        examples = order.global_batch(step) if split == "train" and step is not None else range(len(pairs))
        return mismatched_positions(list(examples), len(pairs))

    def positions(self, split: str, step: int | None = None) -> np.ndarray:
        pairs = self.splits[split]
        assert pairs is not None
        return self.positions_of(pairs, self.order, split, step)

    def _sum(self, split: str, positions: np.ndarray) -> tuple[float, int]:
        pairs = self.splits[split]
        assert pairs is not None
        examples = mismatched_examples(pairs, positions, self.max_length)
        logratios = self.policy(examples) - self.reference(split, positions, examples)
        return float(logratios.sum()), len(positions)

    def step(self, step: int) -> tuple[float, int]:
        """The sum and count over optimizer step `step`'s global batch (0-based)."""
        return self._sum("train", self.positions("train", step))

    def evaluation(self) -> tuple[float, int]:
        """The sum and count over the eval split."""
        return self._sum("eval", self.positions("eval"))
