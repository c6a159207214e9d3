"""The recipe's small parts by hand: the context cap (TrainConfig.fit_to_context), seeding and the stop request
(preftune.runtime)."""

from __future__ import annotations

import random
import signal

import numpy as np
import pytest
import torch

from preftune import TrainConfig
from preftune.runtime import StopRequest, seed_everything


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(model="m", data="d.jsonl", output_dir="o", **kw)


@pytest.mark.parametrize("length, prompt, limit, want, said", [
    (1024, 512, None, (1024, 512), None),    # the model does not say: unchanged
    (256, 128, 256, (256, 128), None),       # fits exactly: unchanged
    (300, 100, 256, (256, 100), "max_length 300 is more than the model's 256 positions: capped it to 256"),
    (300, 256, 256, (256, 128), "and max_prompt_length 256 to 128"),  # a prompt of all positions: half
    (1024, 512, 256, (256, 128), "and max_prompt_length 512 to 128"),
])
def test_fit_to_context(length, prompt, limit, want, said):
    out, line = _cfg(max_length=length, max_prompt_length=prompt).fit_to_context(limit)
    assert (out.max_length, out.max_prompt_length) == want
    if said is None:
        assert line is None
    else:
        assert said in line
        assert ("max_prompt_length" in line) == (want[1] != prompt)


def test_seed_everything_seeds_python_numpy_and_torch():
    seed_everything(11)
    got = (random.random(), float(np.random.rand()), torch.rand(1).item())
    want = (random.Random(11).random(), float(np.random.RandomState(11).rand()),
            torch.rand(1, generator=torch.Generator().manual_seed(11)).item())
    assert got == want


def test_stop_request_flags_the_first_signal_and_raises_on_the_second():
    before = signal.getsignal(signal.SIGTERM)
    with StopRequest() as stop:
        assert stop.signal is None
        signal.raise_signal(signal.SIGTERM)
        assert stop.signal == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is before


def test_evaluating_does_not_change_training(tiny_model_dir, pairs_file, eval_pairs_file, tmp_path):
    """BCO keeps a running reward mean δ that only training rewards may feed: 3 steps with an evaluation after
    every step train exactly like 3 steps with one evaluation at the end (same process, same code path, so
    bit-identical training rows and weights; evaluation rewards in δ would move step 2's loss)."""
    from safetensors.torch import load_file

    from preftune import train
    from preftune.outputs.metrics import read_metrics

    def run(out, eval_steps):
        return train(TrainConfig(model=str(tiny_model_dir), data=str(pairs_file), eval_data=str(eval_pairs_file),
                                 output_dir=str(out), max_steps=3, batch_size=4, learning_rate=1e-2,
                                 warmup_ratio=0.0, loss="bco_pair", eval_steps=eval_steps, progress=False, seed=3,
                                 max_length=64, max_prompt_length=32))

    a, b = run(tmp_path / "a", 1), run(tmp_path / "b", 0)
    def train_rows(res):
        timing = ("pairs_per_s", "tokens_per_s")
        return [{k: v for k, v in r.items() if k not in timing} for r in read_metrics(res.output_dir)
                if r["split"] == "train"]

    assert train_rows(a) == train_rows(b)
    wa, wb = load_file(str(a.final_dir / "model.safetensors")), load_file(str(b.final_dir / "model.safetensors"))
    assert all(torch.equal(wa[n], wb[n]) for n in wa)


def test_sigterm_stops_after_the_step_with_a_checkpoint(tiny_model_dir, pairs_file, tmp_path):
    """A SIGTERM during step 2 (sent by a callback, in this process): the run finishes that step, writes its
    checkpoint (no save_steps asked), reports itself interrupted and writes no final/; the task is 'dpo'."""
    from preftune import train
    from preftune.callbacks import Callback
    from preftune.outputs.checkpoint import list_checkpoints

    class Term(Callback):
        def on_train_begin(self, state):
            self.task = state.task

        def on_step_end(self, state):
            if state.step == 2:
                signal.raise_signal(signal.SIGTERM)

    term = Term()
    res = train(TrainConfig(model=str(tiny_model_dir), data=str(pairs_file), output_dir=str(tmp_path / "run"),
                            max_steps=5, batch_size=4, progress=False, max_length=64, max_prompt_length=32),
                callbacks=[term])
    assert term.task == "dpo"
    assert res.interrupted and res.steps == 2
    assert [p.name for p in list_checkpoints(res.output_dir)] == ["step-0000002"]
    assert not res.final_dir.exists()


def _short(model, data, out, **kw) -> TrainConfig:
    base = dict(model=str(model), data=str(data), output_dir=str(out), max_steps=2, batch_size=4,
                learning_rate=1e-3, warmup_ratio=0.0, progress=False, seed=3, max_length=64, max_prompt_length=32)
    return TrainConfig(**{**base, **kw})


def test_logged_throughputs_have_the_window_s_tokens_per_pair(tiny_model_dir, tmp_path):
    """tokens/s ÷ pairs/s does not depend on the clock: it is the window's tokens per pair, each prompt counted
    once plus both answers (EOS included), here for one step over all 8 pairs, ids from the tokenizer alone."""
    from helpers import make_pairs, write_jsonl
    from independent import hand_ids
    from transformers import AutoTokenizer

    from preftune import train
    from preftune.outputs.metrics import read_metrics

    rows = make_pairs(8, seed=51)
    res = train(_short(tiny_model_dir, write_jsonl(tmp_path / "d.jsonl", rows), tmp_path / "run", max_steps=1,
                       batch_size=8))
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokens = 0
    for r in rows:
        p, c = hand_ids(tok, r["prompt"], r["chosen"])
        _, rj = hand_ids(tok, r["prompt"], r["rejected"])
        tokens += len(p) + len(c) + len(rj)
    first = read_metrics(res.output_dir)[0]
    assert first["pairs_per_s"] > 0
    assert first["tokens_per_s"] / first["pairs_per_s"] == pytest.approx(tokens / 8, rel=1e-9)


def test_logged_grad_norm_is_the_window_mean(tiny_model_dir, pairs_file, tmp_path):
    """Logging every 2 steps logs the mean of the two steps' norms, which a run logging every step shows
    (same process, same numbers)."""
    from preftune import train
    from preftune.outputs.metrics import read_metrics

    each = read_metrics(train(_short(tiny_model_dir, pairs_file, tmp_path / "a")).output_dir)
    pair = read_metrics(train(_short(tiny_model_dir, pairs_file, tmp_path / "b", logging_steps=2)).output_dir)
    assert [r["step"] for r in pair] == [2]
    assert pair[0]["grad_norm"] == pytest.approx((each[0]["grad_norm"] + each[1]["grad_norm"]) / 2, rel=1e-12)
    assert pair[0]["loss"] == pytest.approx((each[0]["loss"] + each[1]["loss"]) / 2, rel=1e-6)


def test_a_skipped_step_logs_zero_grad_norm_and_keeps_the_weights(tiny_model_dir, pairs_file, tmp_path,
                                                                   monkeypatch):
    """NaN log-probs in step 2's forward with on_nonfinite=skip: step 2 logs grad_norm 0 and one skipped step,
    and the weights after it are those after step 1 (a 2-step run's final/ equals a 1-step run's)."""
    from safetensors.torch import load_file

    import preftune.logprobs as logprobs
    from preftune import train
    from preftune.outputs.metrics import read_metrics

    one = train(_short(tiny_model_dir, pairs_file, tmp_path / "one", max_steps=1, lr_scheduler="constant"))
    real, calls = logprobs.forward_logps, []

    def nan_on_second(*a, **k):
        out = real(*a, **k)
        if torch.is_grad_enabled():
            calls.append(1)
            if len(calls) == 2:
                out.chosen_logps = out.chosen_logps * float("nan")
        return out

    monkeypatch.setattr(logprobs, "forward_logps", nan_on_second)
    two = train(_short(tiny_model_dir, pairs_file, tmp_path / "two", on_nonfinite="skip", lr_scheduler="constant"))
    rows = read_metrics(two.output_dir)
    assert rows[1]["grad_norm"] == 0.0 and rows[1]["skipped_steps"] == 1
    wa, wb = load_file(str(one.final_dir / "model.safetensors")), load_file(str(two.final_dir / "model.safetensors"))
    assert all(torch.equal(wa[n], wb[n]) for n in wa)


def test_steps_from_epochs_warmup_from_ratio_and_the_result(tiny_model_dir, tmp_path):
    """No max_steps: 8 pairs in batches of 4 are 2 steps an epoch, so num_epochs 1.5 → ceil(3) = 3 steps; 4 pairs
    and 0.5 epochs → 1 step (never 0). warmup_ratio 0.5 of 3 steps → round(1.5) = 2 warmup steps: constant lr
    1e-3 logged as 0, 0.5e-3, 1e-3. The result carries the last training row and interrupted False."""
    from helpers import make_pairs, write_jsonl

    from preftune import train
    from preftune.outputs.metrics import read_metrics

    data = write_jsonl(tmp_path / "d8.jsonl", make_pairs(8, seed=71))
    res = train(_short(tiny_model_dir, data, tmp_path / "a", max_steps=0, num_epochs=1.5, warmup_ratio=0.5,
                       lr_scheduler="constant"))
    rows = read_metrics(res.output_dir)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["lr"] for r in rows] == pytest.approx([0.0, 0.5e-3, 1e-3])
    assert res.train_metrics == rows[-1] and res.interrupted is False and res.steps == 3
    small = write_jsonl(tmp_path / "d4.jsonl", make_pairs(4, seed=72))
    res = train(_short(tiny_model_dir, small, tmp_path / "b", max_steps=0, num_epochs=0.5))
    assert [r["step"] for r in read_metrics(res.output_dir)] == [1]


def test_config_as_dict_is_checked_and_as_yaml_is_read(tiny_model_dir, pairs_file, tmp_path):
    import yaml

    from preftune import train
    from preftune.errors import PreftuneError

    with pytest.raises(PreftuneError, match="unknown config key 'bogus'"):
        train({"model": str(tiny_model_dir), "data": str(pairs_file), "output_dir": str(tmp_path / "x"), "bogus": 1})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(dict(model=str(tiny_model_dir), data=str(pairs_file), max_steps=1,
                                        output_dir=str(tmp_path / "y"), batch_size=4, progress=False,
                                        max_length=64, max_prompt_length=32)))
    assert train(str(path)).steps == 1


def test_wrong_types_at_the_python_api_are_one_sentence_before_anything_is_written(tmp_path):
    from preftune import train
    from preftune.errors import PreftuneError

    cfg = TrainConfig(model="m", data="d.jsonl", output_dir=str(tmp_path / "o"))
    for config, callbacks, match in ((None, None, "config must be a TrainConfig, a dict .* got NoneType"),
                                     (5, None, "got int"),
                                     (cfg, 5, "callbacks must be a list of preftune.callbacks.Callback objects, got 5"),
                                     (cfg, [print], "callbacks must be a list")):
        with pytest.raises(PreftuneError, match=match):
            train(config, callbacks=callbacks)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("mixed, dtype", [("no", torch.float32), ("bf16", torch.bfloat16)])
def test_mixed_precision_really_autocasts(tiny_model_dir, pairs_file, tmp_path, mixed, dtype):
    """Step 1's loss is ln 2 within bf16 rounding either way, so it cannot tell whether autocast was on; the
    dtype a linear layer's output has in the training forward does."""
    from preftune import train
    from preftune.callbacks import Callback
    from preftune.logprobs import causal_lm

    class Dtypes(Callback):
        def on_train_begin(self, state):
            layer = causal_lm(state.model).get_decoder().layers[0].self_attn.q_proj
            self.handle = layer.register_forward_hook(lambda m, i, out: self.seen.add(out.dtype))

        def on_step_end(self, state):
            self.handle.remove()

    cb = Dtypes()
    cb.seen = set()
    train(_short(tiny_model_dir, pairs_file, tmp_path / "run", max_steps=1, mixed_precision=mixed), callbacks=[cb])
    assert cb.seen == {dtype}
