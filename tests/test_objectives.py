"""Objectives on hand-made log-probs: the loss sum, the metric sums and the logged means, worked out by hand.

σ-loss values used: -log σ(0) = ln 2 = 0.693147, -log σ(0.2) = 0.598139, -log σ(-0.1) = 0.744397.
"""

from __future__ import annotations

import pytest
import torch

from preftune.data.tokenize import TokenizedPair
from preftune.errors import PreftuneError
from preftune.logprobs import SequenceLogps
from preftune.losses import LossConfig
from preftune.objectives import PreferenceObjective, SFTObjective, make_objective


def t(*v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float64)


def _floats(sums: dict) -> dict:
    return {k: float(v) for k, v in sums.items()}


def test_preference_loss_and_metric_sums_by_hand():
    """β = 0.1, 3 pairs. Policy chosen [-10, -20, -5], rejected [-12, -20, -4]; reference chosen [-11, -20, -5],
    rejected [-11, -21, -5]. Log-ratios: chosen [1, 0, 0], rejected [-1, 1, 1]; β·h = [0.2, -0.1, -0.1].
    Loss sum = 0.598139 + 2·0.744397 = 2.086933. Rewards chosen 0.1·[1, 0, 0] → sum 0.1, rejected
    0.1·[-1, 1, 1] → sum 0.1; accuracies: 0.1 > -0.1 yes, 0 > 0.1 no, 0 > 0.1 no → 1. kl_sum = Σ(pc - rc) = 1;
    chosen tokens 4 + 5 + 1 = 10."""
    obj = PreferenceObjective(LossConfig(beta=0.1))
    policy = SequenceLogps(t(-10, -20, -5), t(4, 5, 1), t(-12, -20, -4), t(3, 3, 3))
    ref = SequenceLogps(t(-11, -20, -5), t(4, 5, 1), t(-11, -21, -5), t(3, 3, 3))
    total, sums = obj.loss(policy, ref)
    assert float(total) == pytest.approx(2.086933, abs=1e-6)
    assert _floats(sums) == pytest.approx({
        "loss": 2.086933, "pairs": 3, "chosen_tokens": 10, "logps/chosen": -35, "logps/rejected": -36,
        "rewards/chosen": 0.1, "rewards/rejected": 0.1, "rewards/accuracies": 1, "kl_sum": 1}, abs=1e-6)


def test_equal_rewards_are_not_counted_as_accurate():
    """Policy == reference: every reward is exactly 0, and a tie is not a win (accuracy 0, loss 2·ln 2)."""
    obj = PreferenceObjective(LossConfig())
    policy = SequenceLogps(t(-3, -4), t(1, 1), t(-5, -6), t(1, 1))
    total, sums = obj.loss(policy, policy)
    assert float(total) == pytest.approx(2 * 0.693147, abs=1e-6)
    assert float(sums["rewards/accuracies"]) == 0


def test_reference_free_loss_has_no_kl():
    obj = make_objective("dpo", LossConfig(loss_types=("simpo",)))
    assert not obj.needs_reference
    _, sums = obj.loss(SequenceLogps(t(-4), t(2), t(-6), t(3)), None)
    assert "kl_sum" not in sums


def test_reference_free_objective_says_so():
    """ORPO needs no reference: the objective's note (printed in the run's first lines) says that no reference
    pass runs; a loss that needs one, or SFT, has no note. Its loss sum: λ = 0.1, one pair with mean log-probs
    -ln 2 and -ln 4 (P = 1/2 and 1/4, odds 1 and 1/3): ln 2 + 0.1·ln(4/3) = 0.721915."""
    obj = make_objective("dpo", LossConfig(loss_types=("orpo",)))
    assert not obj.needs_reference
    assert obj.notes == ("reference: none — loss orpo needs no reference model (no reference pass, no "
                         "reference_logps/ folder)",)
    ln2 = 0.6931471805599453
    total, sums = obj.loss(SequenceLogps(t(-2 * ln2), t(2), t(-6 * ln2), t(3)), None)
    assert float(total) == pytest.approx(0.721915, abs=1e-6) and "kl_sum" not in sums
    assert make_objective("dpo", LossConfig(loss_types=("orpo", "sigmoid"))).notes == ()
    assert make_objective("sft", LossConfig()).notes == ()


def test_reference_none_is_refused_where_a_loss_needs_one():
    """`reference: none` with sigmoid would reach the first step with no reference log-probs: one sentence at
    set-up instead. A reference-free loss, and SFT (the same settings, no reference), accept it."""
    with pytest.raises(PreftuneError, match=r"^reference 'none' leaves no reference model, but sigmoid and ipo "
                                            r"need one \(log π/π_ref\); use reference auto, or only reference-free"):
        make_objective("dpo", LossConfig(loss_types=("sigmoid", "orpo", "ipo")), reference="none")
    assert not make_objective("dpo", LossConfig(loss_types=("cpo",)), reference="none").needs_reference
    assert make_objective("sft", LossConfig(), reference="none").name == "sft"


def test_preference_summary_by_hand():
    """Window sums over 4 pairs: loss 2 → 0.5; rewards chosen 0.8 → 0.2, rejected -0.4 → -0.1, margins 0.3;
    accuracies 3 → 0.75; logps -40 → -10, -60 → -15; kl = kl_sum / chosen tokens = 5 / 20 = 0.25."""
    obj = PreferenceObjective(LossConfig())
    m = obj.summarize({"loss": 2.0, "pairs": 4.0, "rewards/chosen": 0.8, "rewards/rejected": -0.4,
                       "rewards/accuracies": 3.0, "logps/chosen": -40.0, "logps/rejected": -60.0,
                       "kl_sum": 5.0, "chosen_tokens": 20.0})
    assert m == pytest.approx({"loss": 0.5, "rewards/chosen": 0.2, "rewards/rejected": -0.1,
                               "rewards/margins": 0.3, "rewards/accuracies": 0.75, "logps/chosen": -10.0,
                               "logps/rejected": -15.0, "kl": 0.25})
    assert "kl" not in obj.summarize({"loss": 1.0, "pairs": 1.0})
    one = obj.summarize({"loss": 0.7, "pairs": 1.0, "kl_sum": 0.3, "chosen_tokens": 1.0})
    assert (one["loss"], one["kl"]) == pytest.approx((0.7, 0.3))  # one pair, one token: the sums themselves
    assert obj.summarize({}) == {k: 0.0 for k in ("loss", "rewards/chosen", "rewards/rejected",
                                                  "rewards/accuracies", "logps/chosen", "logps/rejected",
                                                  "rewards/margins")}


def test_normalisers():
    """DPO: pairs of the global batch; SFT: answer tokens (3 + 1 + 4 = 8)."""
    pairs = [TokenizedPair([1], [2, 3, 4], [5], 0), TokenizedPair([1, 2], [6], [7, 8], 1),
             TokenizedPair([], [9, 9, 9, 9], None, 2)]
    assert PreferenceObjective(LossConfig()).normaliser(pairs) == 3.0
    assert SFTObjective().normaliser(pairs) == 8.0


def test_sft_loss_and_summary_by_hand():
    """SFT: loss sum = -Σ log p = 6 + 2 = 8 over 3 + 1 tokens → logged token mean 2; logps/chosen mean -4."""
    obj = make_objective("sft", LossConfig())
    assert not obj.needs_reference and obj.name == "sft"
    total, sums = obj.loss(SequenceLogps(t(-6, -2), t(3, 1)), None)
    assert float(total) == 8
    assert _floats(sums) == {"loss": 8.0, "pairs": 2.0, "chosen_tokens": 4.0, "logps/chosen": -8.0}
    assert obj.summarize(_floats(sums)) == {"loss": 2.0, "logps/chosen": -4.0}
    assert obj.summarize({}) == {"loss": 0.0, "logps/chosen": 0.0}  # an empty window: zeros, not an error


def test_bco_shift_moves_once_per_step_and_not_after_a_skipped_step():
    """Step 1 (two micro-batches): rewards β·logratios with β = 1: chosen [1, 2] and [3], rejected [0, -1] and
    [1] → δ = (1 + 2 + 3 + 0 - 1 + 1) / 6 = 1, applied only at end_step. A skipped step adds nothing, the next
    one counts; evaluation never feeds δ; the state round-trips."""
    obj = PreferenceObjective(LossConfig(loss_types=("bco_pair",), beta=1.0))
    zero = t(0, 0)

    def add(pc, pr):
        obj.loss(SequenceLogps(pc, torch.ones_like(pc), pr, torch.ones_like(pr)),
                 SequenceLogps(torch.zeros_like(pc), torch.ones_like(pc), torch.zeros_like(pr), torch.ones_like(pr)))

    add(t(1, 2), t(0, -1))
    assert obj.reward_shift.value == 0.0  # not yet: the step is not over
    add(t(3), t(1))
    obj.end_step(lambda values: values)
    assert obj.reward_shift.value == pytest.approx(1.0) and obj.reward_shift.state_dict()["count"] == 6
    add(t(100, 100), zero)
    obj.end_step(lambda values: values, skipped=True)
    assert obj.reward_shift.value == pytest.approx(1.0) and obj.reward_shift.state_dict()["count"] == 6
    add(t(4), t(2))  # the step after a skipped one counts again: (6 + 4 + 2) / 8 = 1.5
    obj.end_step(lambda values: values)
    assert obj.reward_shift.value == pytest.approx(1.5) and obj.reward_shift.state_dict()["count"] == 8
    resumed = PreferenceObjective(LossConfig(loss_types=("bco_pair",), beta=1.0))
    resumed.load_state_dict(obj.state_dict())
    assert resumed.reward_shift.state_dict() == obj.reward_shift.state_dict()
    obj.loss(SequenceLogps(t(50), t(1), t(50), t(1)), SequenceLogps(t(0), t(1), t(0), t(1)), training=False)
    obj.end_step(lambda values: values)  # evaluation rewards never feed the shift
    assert obj.reward_shift.value == pytest.approx(1.5) and obj.reward_shift.state_dict()["count"] == 8


class _Mismatched:
    """Stands in for the reference's mismatched pairs: fixed (sum, count) for a step and for the eval split."""

    def __init__(self, step_sum, eval_sum):
        self.step_sum, self.eval_sum, self.calls = step_sum, eval_sum, []

    def step(self, step):
        self.calls.append(("step", step))
        return self.step_sum

    def evaluation(self):
        self.calls.append(("eval",))
        return self.eval_sum


def _unpaired(loss_types, mismatched):
    from types import SimpleNamespace

    obj = make_objective("dpo", LossConfig(loss_types=loss_types, beta=0.5))
    moved = []
    obj.bind(SimpleNamespace(mismatched=mismatched, end_step=moved.append))
    return obj, moved


def test_kto_loss_sums_and_reference_point_by_hand():
    """β = 0.5; the step's mismatched pairs sum to 1.2 over 4 → z0 = 0.3. Examples: policy [-10, -20, -5],
    reference [-11, -20, -5.6] → log-ratios [1, 0, 0.6], labels [desirable, undesirable, desirable]:
    1-σ(0.5·(1-0.3)) = 0.413382, 1-σ(0.5·(0.3-0)) = 0.462570, 1-σ(0.5·(0.6-0.3)) = 0.462570 → 1.338523.
    Rewards 0.5·[1, 0, 0.6]: desirable sum 0.8 (mean 0.4), undesirable 0; kl = z0 = 0.3. Evaluation uses its own
    estimate, once per step: the eval pairs sum to -2 → z0 = max(0, -0.5) = 0 → 1-σ(0.5) + 1-σ(0) + 1-σ(0.3) =
    1.303098. After the update the reference moves (TR-DPO) with the 1-based step."""
    mism = _Mismatched((1.2, 4), (-2.0, 4))
    obj, moved = _unpaired(("kto",), mism)
    assert obj.name == "unpaired" and obj.needs_reference and obj.needs_mismatched
    obj.begin_step(6)
    policy = SequenceLogps(t(-10, -20, -5), t(4, 5, 1), desirable=torch.tensor([True, False, True]))
    ref = SequenceLogps(t(-11, -20, -5.6), t(4, 5, 1))
    total, sums = obj.loss(policy, ref)
    assert float(total) == pytest.approx(1.338523, abs=1e-6)
    assert _floats(sums) == pytest.approx({
        "loss": 1.338523, "pairs": 3, "desirable": 2, "undesirable": 1, "chosen_tokens": 10, "rewards/chosen": 0.8,
        "rewards/rejected": 0.0, "logps/chosen": -15, "logps/rejected": -20, "kl_sum": 0.9}, abs=1e-6)
    m = obj.summarize(_floats(sums))
    assert m == pytest.approx({"loss": 0.446174, "rewards/chosen": 0.4, "rewards/rejected": 0.0,
                               "rewards/margins": 0.4, "logps/chosen": -7.5, "logps/rejected": -20.0, "kl": 0.3},
                              abs=1e-6)
    for _ in range(2):
        assert float(obj.loss(policy, ref, training=False)[0]) == pytest.approx(1.303098, abs=1e-6)
    assert mism.calls == [("step", 6), ("eval",)]
    obj.end_step(lambda v: v)
    assert moved == [7]


def test_apo_zero_unpaired_needs_no_reference_point():
    """APO-zero per example, β = 0.5, the same examples: desirable 1-σ(0.5) = 0.377541, undesirable σ(0) = 0.5,
    desirable 1-σ(0.3) = 0.425557 → 1.303098; no mismatched pair is scored, no kl logged."""
    mism = _Mismatched((1.2, 4), (-2.0, 4))
    obj, _ = _unpaired(("apo_zero_unpaired",), mism)
    obj.begin_step(0)
    policy = SequenceLogps(t(-10, -20, -5), t(4, 5, 1), desirable=torch.tensor([True, False, True]))
    total, sums = obj.loss(policy, SequenceLogps(t(-11, -20, -5.6), t(4, 5, 1)))
    assert float(total) == pytest.approx(1.303098, abs=1e-6) and "kl_sum" not in sums and not mism.calls
    with pytest.raises(PreftuneError, match="^reference 'none' leaves no reference model, but kto needs one"):
        make_objective("dpo", LossConfig(loss_types=("kto",)), reference="none")
