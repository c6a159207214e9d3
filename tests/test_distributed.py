"""Two processes (DDP over gloo on CPU) with 4 pairs each train exactly like one process with 8."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from preftune.outputs.metrics import read_metrics

TORCHRUN = Path(sys.executable).with_name("torchrun")


@pytest.mark.skipif(not TORCHRUN.exists() and not shutil.which("torchrun"), reason="torchrun not installed")
def test_ddp_two_processes_equal_one_process(tiny_model_dir, pairs_file, tmp_path):
    common = ["train", "--model", str(tiny_model_dir), "--data", str(pairs_file), "--max-steps", "3",
              "--max-length", "64", "--max-prompt-length", "32", "--progress", "false", "--learning-rate", "1e-3",
              "--lr-scheduler", "constant", "--warmup-ratio", "0", "--eval-fraction", "0.25"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run([str(TORCHRUN if TORCHRUN.exists() else "torchrun"), "--nproc_per_node", "2",
                          "--master_port", "29533", "-m", "preftune", *common, "--batch-size", "4",
                          "--output-dir", str(tmp_path / "ddp")], env=env, capture_output=True, text=True,
                         timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert ddp.stdout.count("done: 3 steps") == 1  # one summary line per job
    single = subprocess.run([sys.executable, "-m", "preftune", *common, "--batch-size", "8",
                             "--output-dir", str(tmp_path / "one")], capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]

    a, b = read_metrics(tmp_path / "ddp"), read_metrics(tmp_path / "one")
    assert [(r["step"], r["split"]) for r in a] == [(r["step"], r["split"]) for r in b]
    for ra, rb in zip(a, b):  # logged figures cover the global batch, not rank 0's half
        # At step 1 policy == reference: margins are float noise around 0, so accuracy there is a coin toss.
        keys = ("loss", "rewards/chosen", "kl") + (("rewards/accuracies",) if ra["step"] > 1 else ())
        for key in keys:
            assert ra[key] == pytest.approx(rb[key], abs=1e-5), (ra["step"], ra["split"], key)
    wa = load_file(str(tmp_path / "ddp" / "final" / "model.safetensors"))
    wb = load_file(str(tmp_path / "one" / "final" / "model.safetensors"))
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=1e-5, rtol=0)
