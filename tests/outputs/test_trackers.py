"""Trackers write what their own readers read back: TensorBoard's event reader, MLflow's file store API, the W&B
offline run folder (its transaction log, decoded with W&B's own protobuf classes). The callbacks are driven
with a hand-built TrainState (the recipe's callbacks API is not wired yet)."""

from __future__ import annotations

import struct
from pathlib import Path
from types import SimpleNamespace

import pytest

from preftune import TrainConfig
from preftune.callbacks import ConsoleEval
from preftune.errors import PreftuneError
from preftune.outputs.trackers import TrackerCallback, tracker_values

# Two rows as the recipe logs them: full precision (1e-6 must survive as 1e-6), a non-finite value as null.
ROWS = [
    {"step": 1, "split": "train", "loss": 0.6931471805599453, "rewards/accuracies": 0.5, "lr": 1e-6, "kl": None},
    {"step": 2, "split": "train", "loss": 0.625, "rewards/accuracies": 0.75, "lr": 2e-6, "kl": 0.01},
    {"step": 2, "split": "eval", "loss": 0.65, "rewards/accuracies": 0.625},
]


def _state(tmp_path: Path, **cfg) -> SimpleNamespace:
    config = TrainConfig(model="m", data="d.jsonl", output_dir=str(tmp_path), **cfg)
    return SimpleNamespace(config=config, task="dpo", output_dir=tmp_path, step=0, total_steps=2, steps_per_epoch=2,
                           is_main_process=True, num_processes=1, model=None, tokenizer=None, data_summary="",
                           train_metrics={}, eval_metrics={}, final_dir=None, interrupted=False, device="cpu",
                           data_info={})


def _drive(callback, state) -> None:
    callback.on_train_begin(state)
    for row in ROWS:
        callback.on_log(state, row)
    callback.on_train_end(state)


def test_tracker_values_prefix_split_and_drop_nulls():
    assert tracker_values(ROWS[0]) == {"train/loss": 0.6931471805599453, "train/rewards/accuracies": 0.5,
                                       "train/lr": 1e-6}
    assert tracker_values(ROWS[2]) == {"eval/loss": 0.65, "eval/rewards/accuracies": 0.625}


def test_report_to_is_validated():
    assert TrainConfig(report_to="tensorboard, mlflow").report_to == ["tensorboard", "mlflow"]
    assert TrainConfig(report_to="none").report_to == []
    with pytest.raises(PreftuneError, match="did you mean 'wandb'"):
        TrainConfig(report_to=["wandbb"])


def test_missing_tracker_package_is_one_sentence(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(PreftuneError, match=r"pip install 'preftune\[wandb\]'"):
        TrackerCallback(["wandb"])


def test_tensorboard_event_files_read_back(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install 'preftune[tensorboard]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _drive(TrackerCallback(["tensorboard"], run_name="run"), _state(tmp_path))
    acc = EventAccumulator(str(tmp_path / "tensorboard" / "run"))
    acc.Reload()
    loss = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    # Event files store float32: compare at float32 resolution (relative 6e-8).
    assert [s for s, _ in loss] == [1, 2]
    assert loss[0][1] == pytest.approx(0.6931471805599453, rel=1e-7) and loss[1][1] == 0.625
    assert [e.value for e in acc.Scalars("train/lr")] == pytest.approx([1e-6, 2e-6], rel=1e-7)
    assert [(e.step, e.value) for e in acc.Scalars("eval/rewards/accuracies")] == [(2, 0.625)]
    assert [e.step for e in acc.Scalars("train/kl")] == [2]  # the null at step 1 was left out


def test_mlflow_file_store_reads_back(tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="mlflow is not installed (pip install 'preftune[mlflow]')")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    _drive(TrackerCallback(["mlflow"], run_name="run"), _state(tmp_path, beta=0.25))
    client = MlflowClient((tmp_path / "mlruns").resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("preftune").experiment_id])
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    assert run.data.params["beta"] == "0.25" and run.data.params["task"] == "dpo"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    # MLflow keeps metrics as float64: exact.
    assert sorted((m.step, m.value) for m in history) == [(1, 0.6931471805599453), (2, 0.625)]
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/lr")] == [(1, 1e-6), (2, 2e-6)]


def _wandb_records(path: Path) -> list:
    """Records of a W&B transaction log (.wandb): LevelDB's log format (32 KiB blocks; each chunk a 7-byte
    header: crc32, length, type FULL/FIRST/MIDDLE/LAST) after a 7-byte ':W&B' file header, every record a
    wandb_internal_pb2.Record. wandb ships no Python reader for it since its Go core, so this is one."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        room = 32768 - pos % 32768
        if room < 7:  # block trailer: padding only
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += room
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(pending)
            records.append(rec)
    return records


def test_wandb_offline_run_folder_reads_back(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb", reason="wandb is not installed (pip install 'preftune[wandb]')")
    import json

    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_PROJECT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    _drive(TrackerCallback(["wandb"], run_name="run"), _state(tmp_path, beta=0.25))
    # run.finish() can return before W&B's service process has written the log; teardown waits for it to exit.
    wandb.teardown()
    (log,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")  # offline by default: no key configured
    records = _wandb_records(log)
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    steps = [h for h in history if "train/loss" in h]
    assert [(h["_step"], h["train/loss"]) for h in steps] == [(1, 0.6931471805599453), (2, 0.625)]
    assert steps[0]["train/lr"] == 1e-6
    assert any(h.get("eval/rewards/accuracies") == 0.625 for h in history)
    config = {i.key: json.loads(i.value_json) for r in records if r.WhichOneof("record_type") == "config"
              for i in r.config.update}
    assert config["beta"] == 0.25 and config["task"] == "dpo"


def test_console_eval_callback_prints_eval_rows_only(tmp_path):
    lines: list[str] = []
    cb = ConsoleEval(printer=lines.append)
    _drive(cb, _state(tmp_path))
    assert lines == ["eval @ step 2: loss 0.6500, rewards/accuracies 0.6250"]


def test_trackers_stay_off_on_other_processes(tmp_path):
    state = _state(tmp_path)
    state.is_main_process = False
    _drive(TrackerCallback(["tensorboard"]), state)
    assert not (tmp_path / "tensorboard").exists()
