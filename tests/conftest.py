from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
# Tests never reach a hub: a hub lookup fails at once instead of retrying for seconds.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tiny models gain nothing from intra-op threads, and on a busy 2-core machine a thread pool stalls whenever
# one of its threads is descheduled (measured: the 60-step test 18 s with one thread, 127 s with two).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from helpers import build_tiny_model, make_pairs, write_jsonl  # noqa: E402

torch.set_num_threads(1)

if os.environ.get("MUTANT_UNDER_TEST") == "stats":  # `make mutate` is collecting which tests reach what
    from tools.mutmut_stats_fix import install  # the repository root is on the path (pyproject.toml)

    install()


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "report: this test needs the run report that train() writes at the end")


@pytest.fixture(autouse=True)
def _no_end_of_run_report(request, monkeypatch) -> None:
    """Drawing the run report (matplotlib, 8 PNGs) costs ~0.65 s, four times a whole tiny run: only tests
    marked `report` get it from train(); the report itself is tested by tests/outputs/test_report.py, which is."""
    if request.node.get_closest_marker("report") is None:
        from preftune.outputs.report import ReportCallback

        monkeypatch.setattr(ReportCallback, "on_train_end", lambda self, state: None)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="session")
def pairs_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "pairs.jsonl", make_pairs(64, seed=1))


@pytest.fixture(scope="session")
def eval_pairs_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("eval") / "eval.jsonl", make_pairs(48, seed=2))


@pytest.fixture(scope="session")
def tiny_dpo_run(tmp_path_factory, tiny_model_dir, pairs_file, eval_pairs_file) -> Path:
    """A finished 24-step DPO run of the tiny model with an evaluation every 8 steps (metrics.jsonl, final/)."""
    from preftune import TrainConfig, train

    out = tmp_path_factory.mktemp("runs") / "dpo"
    train(TrainConfig(model=str(tiny_model_dir), data=str(pairs_file), eval_data=str(eval_pairs_file),
                      output_dir=str(out), max_steps=24, batch_size=8, learning_rate=5e-3, beta=0.1, eval_steps=8,
                      max_length=64, max_prompt_length=32, progress=False, seed=0))
    return out
