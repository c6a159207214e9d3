"""Did a round of `preftune iterate` collapse? Pure functions over what a round logged and measured.

On-policy pairs from a small model are a known trap: DPO can widen the margin by pushing both answers down, the
probability goes to text in neither set, and the model degenerates into repeated fragments (FACTS.md: a 5M
model's judged-good share fell from ~52% to 0-8%). Three signals, each measured every round:

- **displacement**: the chosen answers' log-probs fell together with the rejected ones over the round's training
  steps (`outputs.report.likelihood_displacement`, the rule the run report flags);
- **kl**: KL(round's model ‖ round's start) per token on its own held-out samples above `kl_limit` nats;
- **judged**: the judge finds the round's answers worse than its start's on the held-out prompts: the win rate of
  the greedy answers, or of the temperature-1 samples, over the start's has a 95% interval entirely below 50%.

A round collapsed when the judge says it got worse, or when the log-probs fell *and* the KL jumped (each of those
two alone also happens in rounds that went well: DPO lowers the chosen log-probs a little in most runs, and a
policy that learned a lot moves far from its start).

The opposite failure is quieter: a round that barely moved its model (`unmoved`). iterate keeps train's learning
rate, 1e-6, which suits models of billions of parameters; a small model at that rate gives the same greedy answers
after the round as before it, so every later round samples the same pairs again. Measured on the tiny test model,
6 steps: 12 of 12 held-out answers unchanged and KL to the start 2.4e-7, 2.8e-6, 2.7e-5 nats/token at 1e-7, 1e-6,
1e-5; 9 of 12 and 3.0e-4 at 1e-4; 4 of 12 and 6.0e-4 at 1e-3. Unchanged answers alone also mean a round near its
ceiling: the news demo's third round (lr 3e-4) kept 193 of 200 and still rose from 95.0 to 97.5% good, with KL
0.007 to its start. Both must hold: ≥ 95% unchanged and |KL| below 1e-3 nats/token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from preftune.outputs.report import likelihood_displacement


@dataclass
class Verdict:
    collapsed: bool
    signals: dict[str, str] = field(default_factory=dict)  # each signal that fired → what it saw

    def reason(self) -> str:
        return "; ".join(self.signals.values())


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _worse(name: str, result: dict[str, Any] | None) -> str | None:
    if not result or not result.get("n"):
        return None
    lo, hi = result["ci95"]
    if hi >= 0.5:
        return None
    return f"the judge prefers the start's {name} (win rate {_pct(result['win_rate'])}, 95% {_pct(lo)}..{_pct(hi)})"


def check_round(train_rows: list[dict[str, Any]], evaluation: dict[str, Any], *, kl_limit: float) -> Verdict:
    """The collapse signals of one round (see the module docstring): `train_rows` are its train run's metrics.jsonl
    rows, `evaluation` its held-out evaluation (kl_start, vs_start, samples_vs_start)."""
    signals: dict[str, str] = {}
    fell = likelihood_displacement(train_rows)
    if fell is not None:
        c0, c1, r0, r1 = fell
        signals["displacement"] = (f"chosen log-probs fell with the rejected ones (chosen {c0:.1f} → {c1:.1f}, "
                                   f"rejected {r0:.1f} → {r1:.1f} nats)")
    kl = (evaluation.get("kl_start") or {}).get("per_token")
    if kl is not None and kl > kl_limit:
        signals["kl"] = f"KL to the round's start jumped to {kl:.2f} nats/token (limit {kl_limit:g})"
    judged = [s for s in (_worse("greedy answers", evaluation.get("vs_start")),
                          _worse("samples", evaluation.get("samples_vs_start"))) if s]
    if judged:
        signals["judged"] = "; ".join(judged)
    collapsed = "judged" in signals or ("displacement" in signals and "kl" in signals)
    return Verdict(collapsed, signals)


def no_gain(vs_previous: dict[str, Any] | None) -> bool:
    """Whether the win rate over the previous round has a 95% interval that includes 50% (no measurable gain)."""
    if not vs_previous or not vs_previous.get("n"):
        return True
    lo, hi = vs_previous["ci95"]
    return lo <= 0.5 <= hi


def unmoved(evaluation: dict[str, Any], previous: dict[str, Any], *, learning_rate: float,
            share: float = 0.95, kl_below: float = 1e-3) -> str | None:
    """A note when at least `share` of the round's greedy held-out answers are word for word its start's and its KL
    to the start is below `kl_below` nats per token in size (see the module docstring), else None. `evaluation`
    and `previous` are the round's and its start's evaluations."""
    mine = (evaluation.get("greedy") or {}).get("texts") or []
    theirs = (previous.get("greedy") or {}).get("texts") or []
    kl = (evaluation.get("kl_start") or {}).get("per_token")
    if not mine or len(mine) != len(theirs) or kl is None or abs(kl) >= kl_below:
        return None
    same = sum(a == b for a, b in zip(mine, theirs))
    if same < share * len(mine):
        return None
    return (f"{same} of {len(mine)} held-out greedy answers are word for word the start's and KL to it is "
            f"{kl:.1e} nats/token: the round barely moved the model; raise --learning-rate (now {learning_rate:g}) "
            "or train longer (--epochs, --max-steps)")
