"""Several processes train exactly like one: DDP and FSDP2 (2 CPU processes over gloo) against a one-process run of
the same global batch; an FSDP2 run killed mid-way resumes from its sharded checkpoint; final/ is consolidated.

The data: 64 pairs, 24 held out → 40 training pairs, a global batch of 16 → steps of 16, 16 and 8 pairs. The
last step has one micro-batch of 8 for two DDP processes (batch 8 each), so one of them runs a filler; FSDP2 runs
4 per device × 2 processes × 2 accumulation with activation checkpointing (so prefix sharing falls back to one
row per answer). Tolerance 1e-5 (fp32): the processes sum the same numbers in another order (measured gaps:
losses ≤ 2.4e-6, weights ≤ 7.3e-7).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from preftune import TrainConfig, train
from preftune.outputs.checkpoint import list_checkpoints
from preftune.outputs.metrics import read_metrics

TORCHRUN = Path(sys.executable).with_name("torchrun")
ARGS = dict(max_length=64, max_prompt_length=32, learning_rate=1e-3, lr_scheduler="constant", warmup_ratio=0.0,
            eval_fraction=0.375, num_epochs=1, seed=3, progress=False)
needs_torchrun = pytest.mark.skipif(not TORCHRUN.exists() and not shutil.which("torchrun"),
                                    reason="torchrun not installed")

# Run as the torchrun script: the CLI plus two callbacks. One prints the wrapper type of a decoder layer
# (accelerate on CPU would silently use DDP for an FSDP config; preftune must really shard), the other kills
# every process right after metrics line KILL_AFTER, before that step's checkpoint: an exact kill point.
SCRIPT = """
import os, signal, sys
from preftune import recipe
from preftune.callbacks import Callback
from preftune.cli import main

class Probe(Callback):
    def on_train_begin(self, state):
        layer = state.model.model.layers[0]
        print("WRAPPER", type(layer).__name__, type(layer.mlp.up_proj.weight).__name__, flush=True)

    def on_log(self, state, row):
        if row["split"] == "train" and row["step"] >= int(os.environ.get("KILL_AFTER", "1000000")):
            os.kill(os.getpid(), signal.SIGKILL)

defaults = recipe.default_callbacks
recipe.default_callbacks = lambda cfg: defaults(cfg) + [Probe()]
sys.exit(main(sys.argv[1:]))
"""


def _flags(values: dict) -> list[str]:
    return [x for k, v in values.items() for x in ("--" + k.replace("_", "-"), str(v))]


def _torchrun(script: Path, model: Path, data: Path, out: Path, env: dict, **kw) -> subprocess.CompletedProcess:
    cmd = [str(TORCHRUN if TORCHRUN.exists() else "torchrun"), "--standalone", "--nproc_per_node", "2",
           str(script), "train", "--model", str(model), "--data", str(data), "--output-dir", str(out),
           *_flags({**ARGS, **kw})]
    return subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1", **env}, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def one_process(tiny_model_dir, pairs_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "run"
    train(TrainConfig(model=str(tiny_model_dir), data=str(pairs_file), output_dir=str(out), batch_size=16, **ARGS))
    return out


@pytest.fixture(scope="module")
def script(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("script") / "run_preftune.py"
    path.write_text(SCRIPT)
    return path


def _same_run(a: Path, b: Path) -> None:
    ra, rb = read_metrics(a), read_metrics(b)
    assert [(r["step"], r["split"]) for r in ra] == [(r["step"], r["split"]) for r in rb] == \
        [(1, "train"), (2, "train"), (3, "train"), (3, "eval")]
    for x, y in zip(ra, rb):  # logged figures cover the global batch, not rank 0's half
        # At step 1 policy == reference: margins are float noise around 0, so accuracy there is a coin toss.
        keys = ("loss", "rewards/chosen", "kl", "logps/chosen") + (("rewards/accuracies",) if x["step"] > 1 else ())
        for key in keys:
            assert x[key] == pytest.approx(y[key], abs=1e-5), (x["step"], x["split"], key)
    wa = load_file(str(a / "final" / "model.safetensors"))
    wb = load_file(str(b / "final" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], atol=1e-5, rtol=0)


@needs_torchrun
def test_ddp_two_processes_equal_one_process(tiny_model_dir, pairs_file, one_process, script, tmp_path):
    res = _torchrun(script, tiny_model_dir, pairs_file, tmp_path / "ddp", {}, batch_size=8)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("done: 3 steps") == 1  # one summary line per job
    assert "engine: DDP over 2 processes; global batch 16 = 8 per device × 2 processes × 1" in res.stdout
    _same_run(one_process, tmp_path / "ddp")


@needs_torchrun
def test_fsdp2_killed_and_resumed_equals_one_process(tiny_model_dir, pairs_file, one_process, script, tmp_path):
    """FSDP2 with activation checkpointing and accumulation, SIGKILLed after logging step 2 (checkpoint of step
    1 on disk), resumed under FSDP2: the same metrics and final weights as one process; final/ is a plain
    consolidated model that transformers loads."""
    if not hasattr(torch.distributed, "fsdp") or not hasattr(torch.distributed.fsdp, "fully_shard"):
        pytest.skip(f"this torch ({torch.__version__}) has no FSDP2 (torch.distributed.fsdp.fully_shard)")
    out = tmp_path / "fsdp"
    env = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
           "FSDP_ACTIVATION_CHECKPOINTING": "true"}
    kw = dict(batch_size=4, gradient_accumulation_steps=2, save_steps=1)
    killed = _torchrun(script, tiny_model_dir, pairs_file, out, {**env, "KILL_AFTER": "2"}, **kw)
    assert killed.returncode != 0 and not (out / "final").exists(), killed.stderr[-3000:]
    # Really sharded: decoder layers are FSDP modules holding DTensor shards, not DDP replicas.
    assert "WRAPPER FSDPCheckpointWrapper DTensor" in killed.stdout, killed.stdout[-2000:]
    assert [p.name for p in list_checkpoints(out)] == ["step-0000001"]
    assert len(list((out / "checkpoints" / "step-0000001" / "state").glob("*.distcp"))) == 2  # one per process

    resumed = _torchrun(script, tiny_model_dir, pairs_file, out, env, resume="true", **kw)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "prefix sharing off" in resumed.stdout
    _same_run(one_process, out)

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert torch.equal(model.lm_head.weight, load_file(str(out / "final" / "model.safetensors"))["lm_head.weight"])
