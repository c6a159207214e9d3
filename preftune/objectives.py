"""What a task trains: the DPO family on pairs, KTO and APO-zero on unpaired examples, or supervised fine-tuning
(SFT) on one answer.

An objective says whether it needs reference log-probs, turns a micro-batch's statistics into the sum of its
per-example losses plus additive metric sums, gives the normaliser of a global batch (so accumulated
micro-batches and processes add up to the gradient of one big batch), and turns a window of sums into the
logged means. It is told when each optimizer step begins and ends, and holds the run's reference (`bind`): KTO
estimates its reference point from the whole global batch before the step's micro-batches run, TR-DPO's
reference moves after the update. The recipe (recipe.py) asks it; it never branches on the task itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from preftune.data.tokenize import TokenizedPair
from preftune.errors import PreftuneError
from preftune.logprobs import SequenceLogps
from preftune.losses import (
    LOSSES,
    REFERENCE_FREE,
    LossConfig,
    RewardShift,
    kto_reference_point,
    preference_loss,
    unpaired_loss,
)

if TYPE_CHECKING:
    from preftune.modeling.reference import ReferenceSetup


class Objective:
    """Interface; see `PreferenceObjective` and `SFTObjective`."""

    name: str
    needs_reference: bool = False
    needs_mismatched: bool = False  # KTO: the reference also scores mismatched (prompt, answer) pairs
    notes: tuple[str, ...] = ()  # lines the run prints before training (what the objective decided)
    reference: ReferenceSetup | None = None
    step: int = 0  # the optimizer step under way (0-based), from `begin_step`

    def bind(self, reference: ReferenceSetup) -> None:
        """The run's reference, once it is built (the step hooks below use it)."""
        self.reference = reference

    def begin_step(self, step: int) -> None:
        """Before optimizer step `step` (0-based) runs its micro-batches."""
        self.step = step

    def normaliser(self, pairs: Sequence[TokenizedPair]) -> float:
        """What one global batch's loss sum is divided by (these are this process's examples of it)."""
        raise NotImplementedError

    def loss(self, policy: SequenceLogps, reference: SequenceLogps | None,
             training: bool = True) -> tuple[torch.Tensor, dict[str, Any]]:
        """(sum of the micro-batch's per-example losses, additive metric sums)."""
        raise NotImplementedError

    def end_step(self, all_reduce_sum: Callable[[list[float]], list[float]], skipped: bool = False) -> None:
        """Called once per optimizer step, after the update (state that must see the whole global batch);
        `skipped`: the step's update was dropped (a non-finite loss or gradient), so it teaches nothing. A moving
        reference (TR-DPO) moves here, after the update, as TRL's callback does."""
        if self.reference is not None:
            self.reference.end_step(self.step + 1)

    def summarize(self, sums: dict[str, float]) -> dict[str, float]:
        """Logged means from a window's sums (summed over processes)."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class PreferenceObjective(Objective):
    """DPO and its family: `preference_loss` per pair, normalised by the number of pairs.

    Metrics: loss, rewards/chosen|rejected|margins|accuracies (implicit rewards β·log πθ/πref), logps/chosen|
    rejected (summed log-probs), and kl: Σ(log πθ − log πref) over chosen tokens / chosen tokens, a per-token
    estimate of KL(πθ‖πref) on the chosen answers (when there is a reference).
    """

    name = "dpo"

    def __init__(self, loss_config: LossConfig, reference: str = "auto"):
        """`reference`: the run's strategy; `none` is refused (one sentence) when a loss needs a reference."""
        self.loss_config = loss_config
        self.needs_reference = loss_config.needs_reference
        if reference == "none" and self.needs_reference:
            needing = [t for t in loss_config.loss_types if not LOSSES[t].reference_free]
            raise PreftuneError(f"reference 'none' leaves no reference model, but {' and '.join(needing)} "
                                f"need{'s' if len(needing) == 1 else ''} one (log π/π_ref); use reference auto, or "
                                f"only reference-free losses ({', '.join(sorted(REFERENCE_FREE))}).")
        if not self.needs_reference:
            self.notes = (f"reference: none — loss {'+'.join(loss_config.loss_types)} needs no reference model "
                          "(no reference pass, no reference_logps/ folder)",)
        # BCO's δ is the mean of all rewards seen before this step: rewards of the step's micro-batches are
        # held back until `end_step`, so accumulation gives the same δ (and loss) as one big batch.
        self.reward_shift = RewardShift()
        self._step_rewards: list[torch.Tensor] = []

    def normaliser(self, pairs: Sequence[TokenizedPair]) -> float:
        return float(len(pairs))

    def loss(self, policy: SequenceLogps, reference: SequenceLogps | None,
             training: bool = True) -> tuple[torch.Tensor, dict[str, Any]]:
        ref_c = reference.chosen_logps if reference is not None else None
        ref_r = reference.rejected_logps if reference is not None else None
        res = preference_loss(
            policy.chosen_logps, policy.rejected_logps, ref_c, ref_r, policy.chosen_lengths, policy.rejected_lengths,
            self.loss_config, reward_shift=self.reward_shift.value,
            policy_chosen_shared_logps=policy.chosen_shared_logps,
            policy_rejected_shared_logps=policy.rejected_shared_logps,
            reference_chosen_shared_logps=reference.chosen_shared_logps if reference is not None else None,
            reference_rejected_shared_logps=reference.rejected_shared_logps if reference is not None else None,
            chosen_aligned_logps=policy.chosen_aligned_logps, rejected_aligned_logps=policy.rejected_aligned_logps)
        if training and self.loss_config.uses_reward_shift:
            self._step_rewards += [res.chosen_rewards, res.rejected_rewards]
        total = res.losses.sum()
        pc, pr = policy.chosen_logps.detach(), policy.rejected_logps.detach()
        sums: dict[str, Any] = {
            "loss": total.detach(), "pairs": len(pc), "chosen_tokens": policy.chosen_lengths.sum(),
            "logps/chosen": pc.sum(), "logps/rejected": pr.sum(),
            "rewards/chosen": res.chosen_rewards.sum(), "rewards/rejected": res.rejected_rewards.sum(),
            "rewards/accuracies": (res.chosen_rewards > res.rejected_rewards).sum(),
        }
        if ref_c is not None:
            sums["kl_sum"] = (pc - ref_c).sum()
        return total, sums

    def end_step(self, all_reduce_sum: Callable[[list[float]], list[float]], skipped: bool = False) -> None:
        super().end_step(all_reduce_sum, skipped)
        if not self.loss_config.uses_reward_shift:
            return
        if skipped:
            self._step_rewards = []
            return
        flat = torch.cat([r.reshape(-1) for r in self._step_rewards]) if self._step_rewards else torch.zeros(0)
        total, count = all_reduce_sum([float(flat.double().sum()), float(flat.numel())])
        self.reward_shift.add(total, int(round(count)))
        self._step_rewards = []

    def summarize(self, sums: dict[str, float]) -> dict[str, float]:
        n = max(sums.get("pairs", 0.0), 1.0)
        m = {k: sums.get(k, 0.0) / n for k in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
                                                 "logps/chosen", "logps/rejected")}
        m["rewards/margins"] = m["rewards/chosen"] - m["rewards/rejected"]
        if "kl_sum" in sums:
            m["kl"] = sums["kl_sum"] / max(sums.get("chosen_tokens", 0.0), 1.0)
        return m

    def state_dict(self) -> dict[str, Any]:
        return {"reward_shift": self.reward_shift.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "reward_shift" in state:
            self.reward_shift.load_state_dict(state["reward_shift"])


class SFTObjective(Objective):
    """Supervised fine-tuning: token-level NLL of the answer (prompt tokens masked), every answer token of the
    global batch weighing the same, so the normaliser is the batch's answer-token count."""

    name = "sft"

    def normaliser(self, pairs: Sequence[TokenizedPair]) -> float:
        return float(sum(len(p.chosen_ids) for p in pairs))

    def loss(self, policy: SequenceLogps, reference: SequenceLogps | None,
             training: bool = True) -> tuple[torch.Tensor, dict[str, Any]]:
        total = -policy.chosen_logps.sum()
        return total, {"loss": total.detach(), "pairs": len(policy.chosen_logps),
                       "chosen_tokens": policy.chosen_lengths.sum(), "logps/chosen": policy.chosen_logps.detach().sum()}

    def summarize(self, sums: dict[str, float]) -> dict[str, float]:
        return {"loss": sums.get("loss", 0.0) / max(sums.get("chosen_tokens", 0.0), 1.0),  # token-level, as trained
                "logps/chosen": sums.get("logps/chosen", 0.0) / max(sums.get("pairs", 0.0), 1.0)}


class UnpairedObjective(Objective):
    """KTO and APO-zero on unpaired examples (one answer with a desirable/undesirable label; preftune.data.unpaired):
    `unpaired_loss` per example, normalised by the examples of the global batch.

    KTO's reference point z0 is estimated once per optimizer step, in `begin_step`, before its micro-batches run:
    from the mismatched (prompt, answer) pairs of the whole global batch under the policy and the reference
    (modeling/mismatched.py), the same number on every process and whatever the accumulation; evaluation
    estimates its own from the eval split, once per evaluation. Metrics: loss, rewards/chosen|rejected|margins
    (mean β·log π/π_ref of the desirable and of the undesirable examples), logps/chosen|rejected (their summed
    log-probs), and with KTO kl: z0 as the loss used it (clamped at 0; TRL's `kl`).
    """

    name = "unpaired"
    needs_reference = True

    def __init__(self, loss_config: LossConfig, reference: str = "auto"):
        names = "+".join(loss_config.loss_types)
        if reference == "none":
            raise PreftuneError(f"reference 'none' leaves no reference model, but {names} needs one (log π/π_ref); "
                                "use reference auto.")
        self.loss_config = loss_config
        self.needs_mismatched = "kto" in loss_config.loss_types
        self.reference_point = 0.0
        self._eval_point: float | None = None

    def normaliser(self, pairs: Sequence[TokenizedPair]) -> float:
        return float(len(pairs))

    def begin_step(self, step: int) -> None:
        super().begin_step(step)
        self._eval_point = None  # the policy moves: the next evaluation estimates z0 again
        if self.needs_mismatched:
            assert self.reference is not None and self.reference.mismatched is not None
            self.reference_point = float(kto_reference_point(*self.reference.mismatched.step(step)))

    def _evaluation_point(self) -> float:
        if not self.needs_mismatched:
            return 0.0
        if self._eval_point is None:
            assert self.reference is not None and self.reference.mismatched is not None
            self._eval_point = float(kto_reference_point(*self.reference.mismatched.evaluation()))
        return self._eval_point

    def loss(self, policy: SequenceLogps, reference: SequenceLogps | None,
             training: bool = True) -> tuple[torch.Tensor, dict[str, Any]]:
        assert reference is not None and policy.desirable is not None
        z0 = self.reference_point if training else self._evaluation_point()
        losses, rewards = unpaired_loss(policy.chosen_logps, reference.chosen_logps, policy.desirable,
                                        self.loss_config, z0)
        total = losses.sum()
        good = policy.desirable.to(rewards.device)
        pc = policy.chosen_logps.detach()
        sums: dict[str, Any] = {
            "loss": total.detach(), "pairs": len(pc), "desirable": good.sum(), "undesirable": (~good).sum(),
            "chosen_tokens": policy.chosen_lengths.sum(), "rewards/chosen": rewards[good].sum(),
            "rewards/rejected": rewards[~good].sum(), "logps/chosen": pc[good].sum(), "logps/rejected": pc[~good].sum(),
        }
        if self.needs_mismatched:
            sums["kl_sum"] = z0 * len(pc)
        return total, sums

    def summarize(self, sums: dict[str, float]) -> dict[str, float]:
        n = max(sums.get("pairs", 0.0), 1.0)
        good, bad = max(sums.get("desirable", 0.0), 1.0), max(sums.get("undesirable", 0.0), 1.0)
        m = {"loss": sums.get("loss", 0.0) / n}
        for key, count in (("rewards/chosen", good), ("rewards/rejected", bad), ("logps/chosen", good),
                           ("logps/rejected", bad)):
            m[key] = sums.get(key, 0.0) / count
        m["rewards/margins"] = m["rewards/chosen"] - m["rewards/rejected"]
        if "kl_sum" in sums:
            m["kl"] = sums["kl_sum"] / n
        return m


def make_objective(task: str, loss_config: LossConfig, reference: str = "auto") -> Objective:
    """The objective of `task` (sft, or the DPO family: on unpaired examples when its losses read them);
    `reference` is the run's reference strategy."""
    if task == "sft":
        return SFTObjective()
    if loss_config.unpaired:
        return UnpairedObjective(loss_config, reference)
    return PreferenceObjective(loss_config, reference)
