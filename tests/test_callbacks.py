"""Callbacks see every event of a run, in order, with the rows metrics.jsonl holds."""

from __future__ import annotations

from preftune import TrainConfig, train
from preftune.callbacks import Callback
from preftune.outputs.metrics import read_metrics


class Recorder(Callback):
    def __init__(self) -> None:
        self.events: list[tuple] = []

    def on_train_begin(self, state):
        self.events.append(("begin", state.step, state.total_steps, state.steps_per_epoch))
        self.seen = (type(state.config).__name__, state.tokenizer is not None, state.is_main_process, state.task)

    def on_step_end(self, state):
        self.events.append(("step", state.step))

    def on_log(self, state, row):
        self.events.append(("log", row["step"], row["split"], dict(row)))

    def on_save(self, state, path):
        self.events.append(("save", state.step, path.name))

    def on_train_end(self, state):
        self.events.append(("end", state.step, state.final_dir.name, state.interrupted,
                            state.eval_metrics.get("step")))


class Phases(Callback):
    def __init__(self) -> None:
        self.seen: list[tuple] = []

    def on_phase_start(self, state, name):
        self.seen.append(("start", name, state.step, state.output_dir.name))

    def on_phase_end(self, state, name, seconds):
        assert 0 <= seconds < 600
        self.seen.append(("end", name))


def test_events_in_order_with_the_logged_rows(tiny_model_dir, pairs_file, tmp_path):
    """4 steps of 4 pairs over 48 training pairs (64 minus 16 held out = 12 steps per epoch), logging every 2,
    evaluating at step 2 (and at the end), a checkpoint every 3 steps (keep 1)."""
    rec, phases = Recorder(), Phases()
    res = train(TrainConfig(model=str(tiny_model_dir), data=str(pairs_file), output_dir=str(tmp_path / "run"),
                            max_steps=4, batch_size=4, logging_steps=2, eval_steps=2, save_steps=3,
                            save_total_limit=1, eval_fraction=0.25, progress=False, max_length=64,
                            max_prompt_length=32), callbacks=[rec, phases])
    kinds = [(e[0],) + tuple(x for x in e[1:3] if not isinstance(x, dict)) for e in rec.events]
    assert kinds == [("begin", 0, 4), ("step", 1), ("step", 2), ("log", 2, "train"), ("log", 2, "eval"),
                     ("step", 3), ("save", 3, "step-0000003"), ("step", 4), ("log", 4, "train"),
                     ("log", 4, "eval"), ("save", 4, "final"), ("end", 4, "final")]
    assert rec.events[0][3] == 12
    assert rec.seen == ("TrainConfig", True, True, "dpo")
    assert rec.events[-1][3:] == (False, 4)
    logged = [e[3] for e in rec.events if e[0] == "log"]
    assert logged == read_metrics(res.output_dir)  # the same rows, at full precision
    # epochs done at each training log: 2/12 and 4/12 of an epoch
    assert [r["epoch"] for r in logged if r["split"] == "train"] == [0.1667, 0.3333]
    # Every phase starts and ends, in the order the run goes through them (no resume here), the state there
    # from the first one on; the steps phase starts at step 0, the final save after step 4.
    names = ["data", "model", "prepare", "reference", "steps", "evaluate", "save"]
    assert phases.seen == [e for n in names for e in (("start", n, 4 if n in ("evaluate", "save") else 0, "run"),
                                                       ("end", n))]
