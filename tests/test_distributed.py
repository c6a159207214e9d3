"""Several processes train exactly like one: DDP and FSDP2 (2 CPU processes over gloo) against a one-process run of
the same global batch; an FSDP2 run killed mid-way resumes from its sharded checkpoint; final/ is consolidated.

The data: 64 pairs, 24 held out → 40 training pairs, a global batch of 16 → steps of 16, 16 and 8 pairs. The
last step has one micro-batch of 8 for two DDP processes (batch 8 each), so one of them runs a filler; FSDP2 runs
4 per device × 2 processes × 2 accumulation with activation checkpointing (packed prefix sharing, chosen by the
forward plan's probe on a two-layer model before sharding). Tolerance 1e-5 (fp32): the processes sum the same
numbers in another order (measured gaps: losses ≤ 2.4e-6, weights ≤ 7.3e-7).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from preftune import TrainConfig, train
from preftune.cli import main
from preftune.outputs.checkpoint import list_checkpoints
from preftune.outputs.metrics import read_metrics

TORCHRUN = Path(sys.executable).with_name("torchrun")
ARGS = dict(max_length=64, max_prompt_length=32, learning_rate=1e-3, lr_scheduler="constant", warmup_ratio=0.0,
            eval_fraction=0.375, num_epochs=1, seed=3, progress=False)
needs_torchrun = pytest.mark.skipif(not TORCHRUN.exists() and not shutil.which("torchrun"),
                                    reason="torchrun not installed")

# Run as the torchrun script: the CLI with a callback (cli.main's `callbacks`) whose two events check the run. One
# prints the wrapper type of a decoder layer (accelerate on CPU would silently use DDP for an FSDP config; preftune
# must really shard), the other kills every process right after metrics line KILL_AFTER, before that step's
# checkpoint: an exact kill point.
SCRIPT = """
import os, signal, sys
from preftune.callbacks import Callback
from preftune.cli import main

class Probe(Callback):
    def on_train_begin(self, state):
        layer = state.model.model.layers[0]
        print("WRAPPER", type(layer).__name__, type(layer.mlp.up_proj.weight).__name__, flush=True)
        print("PLAN", state.plan.path, state.plan.rows, flush=True)  # the plan the wrapped handle runs

    def on_log(self, state, row):
        if row["split"] == "train" and row["step"] >= int(os.environ.get("KILL_AFTER", "1000000")):
            os.kill(os.getpid(), signal.SIGKILL)

sys.exit(main(sys.argv[1:], callbacks=[Probe()]))
"""


def _flags(values: dict) -> list[str]:
    return [x for k, v in values.items() for x in ("--" + k.replace("_", "-"), str(v))]


def _launch(script: Path, argv: list[str], env: dict) -> subprocess.CompletedProcess:
    """`script` (the CLI with the Probe callback) under torchrun with 2 processes, given the CLI's `argv`."""
    cmd = [str(TORCHRUN if TORCHRUN.exists() else "torchrun"), "--standalone", "--nproc_per_node", "2",
           str(script), *argv]
    # PYTHONFAULTHANDLER: a process that dies of a signal prints every thread's Python stack in stderr
    return subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1", **env},
                          capture_output=True, text=True, timeout=300)


def _torchrun(script: Path, model: Path, data: Path, out: Path, env: dict, **kw) -> subprocess.CompletedProcess:
    return _launch(script, ["train", "--model", str(model), "--data", str(data), "--output-dir", str(out),
                            *_flags({**ARGS, **kw})], env)


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
        # grad_norm is the clipped-before norm of the global batch's mean gradient: a scale error in how the
        # processes' gradients are averaged (AdamW hides it in the weights) shows here.
        for key in keys:
            assert x[key] == pytest.approx(y[key], abs=1e-5), (x["step"], x["split"], key)
        if x["split"] == "train":
            assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4), x["step"]
    wa = load_file(str(a / "final" / "model.safetensors"))
    wb = load_file(str(b / "final" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], atol=1e-5, rtol=0)


@needs_torchrun
def test_ddp_two_processes_equal_one_process(tiny_model_dir, pairs_file, one_process, script, tmp_path):
    # With a shared data cache, rank 0 tokenizes first and rank 1 reads its entry (Engine.local_main_first).
    res = _torchrun(script, tiny_model_dir, pairs_file, tmp_path / "ddp", {}, batch_size=8,
                    data_cache_dir=tmp_path / "cache")
    assert res.returncode == 0, res.stderr[-3000:]
    assert [p.name.startswith(".tmp") for p in (tmp_path / "cache").iterdir()] == [False]  # one entry, no leftovers
    assert res.stdout.count("done: 3 steps") == 1  # one summary line per job
    assert "engine: DDP over 2 processes; global batch 16 = 8 per device × 2 processes × 1" in res.stdout
    # the plan the DDP-wrapped handle runs is the one decided before wrapping, on both processes
    assert "speed: packed prefix sharing" in res.stdout and res.stdout.count("PLAN packed pair") == 2
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
    assert killed.stdout.count("PLAN packed pair") == 2  # the plan decided before sharding, still in force after
    assert [p.name for p in list_checkpoints(out)] == ["step-0000001"]
    assert len(list((out / "checkpoints" / "step-0000001" / "state").glob("*.distcp"))) == 2  # one per process

    resumed = _torchrun(script, tiny_model_dir, pairs_file, out, env, resume="true", **kw)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # The forward plan's probe runs on a two-layer model built before sharding: auto is packed under FSDP2 too.
    assert "resumed from" in resumed.stdout and "speed: packed prefix sharing" in resumed.stdout
    _same_run(one_process, out)

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert torch.equal(model.lm_head.weight, load_file(str(out / "final" / "model.safetensors"))["lm_head.weight"])


@needs_torchrun
def test_fsdp2_kv_cache_under_activation_checkpointing_becomes_one_row_per_answer(tiny_model_dir, pairs_file,
                                                                                  one_process, script, tmp_path):
    """`--prefix-sharing cache` under FSDP2 activation checkpointing: the plan, told the engine's facts, takes one
    row per answer (a replayed layer would extend the shared KV cache twice), says so, and trains exactly like
    one process."""
    if not hasattr(torch.distributed, "fsdp") or not hasattr(torch.distributed.fsdp, "fully_shard"):
        pytest.skip(f"this torch ({torch.__version__}) has no FSDP2 (torch.distributed.fsdp.fully_shard)")
    env = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
           "FSDP_ACTIVATION_CHECKPOINTING": "true"}
    res = _torchrun(script, tiny_model_dir, pairs_file, tmp_path / "cache", env, batch_size=4,
                    gradient_accumulation_steps=2, prefix_sharing="cache")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "speed: no prefix sharing (one row per answer)" in res.stdout, res.stdout[-2000:]
    assert "KV-cache prefix sharing cannot run under activation checkpointing" in res.stderr
    _same_run(one_process, tmp_path / "cache")


CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"


@pytest.mark.parametrize("name, engine, processes", [
    ("1gpu", "NO", 1), ("ddp_8gpu", "MULTI_GPU", 8), ("fsdp2_8gpu", "FSDP", 8), ("zero2_8gpu", "DEEPSPEED", 8),
    ("zero3_8gpu", "DEEPSPEED", 8), ("fsdp2_2nodes", "FSDP", 16)])
def test_ready_made_accelerate_configs_parse(name, engine, processes):
    """accelerate reads each config as documented; FSDP ones ask for FSDP2 (the only FSDP preftune runs) and the
    ZeRO-3 one gathers 16-bit weights (final/ needs them)."""
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(CONFIGS / f"{name}.yaml"))
    assert (cfg.distributed_type.name, cfg.num_processes, cfg.mixed_precision) == (engine, processes, "bf16")
    if engine == "FSDP":
        assert cfg.fsdp_config["fsdp_version"] == 2 and cfg.fsdp_config["fsdp_auto_wrap_policy"] == \
            "TRANSFORMER_BASED_WRAP"
    if name == "zero3_8gpu":
        assert cfg.deepspeed_config["zero_stage"] == 3 and cfg.deepspeed_config["zero3_save_16bit_model"]


def test_resume_accepts_another_launch_shape_only_with_the_same_global_batch(tmp_path):
    import json

    from preftune.distributed import check_launch
    from preftune.errors import PreftuneError

    def launch(engine, n, bs, acc):
        return {"engine": engine, "num_processes": n, "batch_size": bs, "gradient_accumulation_steps": acc,
                "global_batch": n * bs * acc}

    ckpt = tmp_path / "step-0000002"
    ckpt.mkdir()
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 2, "launch": launch("fsdp2", 2, 4, 2)}))
    from preftune.outputs.identity import global_batch_change

    check_launch(ckpt, launch("single", 1, 16, 1))  # 16 = 16: resharded on load
    check_launch(ckpt, launch("ddp", 4, 2, 2))
    saved = launch("fsdp2", 2, 4, 2)
    assert global_batch_change(saved, launch("ddp", 4, 2, 2)) is None
    assert global_batch_change(saved, launch("single", 1, 8, 1)) == (
        "the global batch 16 (4 per device × 2 processes × 2 accumulation) → 8 (8 per device × 1 processes × "
        "1 accumulation): another launch shape may resume only with the same product")
    with pytest.raises(PreftuneError, match="DeepSpeed checkpoints resume only"):
        check_launch(ckpt, launch("deepspeed", 2, 4, 2))


@pytest.mark.parametrize("env, needle", [
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 says this is one of 2 processes, but RANK, MASTER_ADDR, MASTER_PORT are not"),
    ({"WORLD_SIZE": "banana"}, "WORLD_SIZE='banana' is not a whole number >= 1"),
    ({"WORLD_SIZE": "0"}, "WORLD_SIZE='0' is not a whole number >= 1"),
    ({"LOCAL_RANK": "banana"}, "LOCAL_RANK='banana' is not a whole number"),
    ({"RANK": "1"}, "process RANK=1 of WORLD_SIZE=1"),
    ({"LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2"}, "LOCAL_RANK=2 of LOCAL_WORLD_SIZE=2"),
    ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "70000"}, "MASTER_PORT=70000 is not a port"),
    ({"ACCELERATE_USE_FSDP": "maybe"}, "ACCELERATE_USE_FSDP='maybe' is not true or false"),
    ({"ACCELERATE_MIXED_PRECISION": "fp8"}, "ACCELERATE_MIXED_PRECISION='fp8' (the accelerate config's"),
    ({"ACCELERATE_MIXED_PRECISION": "junk"}, "is not a precision preftune trains in"),
])
def test_launch_environment_is_checked_in_one_sentence(env, needle):
    from preftune.errors import PreftuneError
    from preftune.launch import check_environment

    with pytest.raises(PreftuneError) as e:
        check_environment(env)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_what_launchers_set_is_accepted():
    from preftune.launch import check_environment, launcher_precision

    torchrun = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": "29500", "GROUP_RANK": "0", "ACCELERATE_MIXED_PRECISION": "BF16",
                "ACCELERATE_USE_FSDP": "true"}
    check_environment(torchrun)
    check_environment({})
    assert launcher_precision(torchrun) == "bf16" and launcher_precision({}) is None


@needs_torchrun
def test_kto_two_processes_equal_one_process(tiny_model_dir, script, tmp_path):
    """KTO's reference point is one estimate per global batch (the README's convention), so 2 processes × 2
    unpaired examples train like one process with 4: 3 steps at lr 1e-2 (kl grows from 0 to ~1 by step 3), the same
    losses, kl and gradient norms at the suite's 1e-5 for fp32 sums taken in another order."""
    from helpers import make_pairs, write_jsonl

    rows = [{"prompt": p["prompt"], "completion": p[k], "label": k == "chosen"}
            for p in make_pairs(8, seed=5) for k in ("chosen", "rejected")]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    kw = dict(loss="kto", beta=0.5, max_steps=3, learning_rate=1e-2, eval_fraction=0.0)
    one = tmp_path / "one"
    train(TrainConfig(model=str(tiny_model_dir), data=str(data), output_dir=str(one), batch_size=4,
                      **{**ARGS, **kw}))
    res = _torchrun(script, tiny_model_dir, data, tmp_path / "two", {}, batch_size=2, **kw)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "engine: DDP over 2 processes; global batch 4 = 2 per device × 2 processes × 1" in res.stdout
    a, b = ([r for r in read_metrics(run) if r["split"] == "train"] for run in (one, tmp_path / "two"))
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
    assert a[2]["kl"] > 0.1  # the policy moved: the reference point is not the clamped 0 of step 1
    for x, y in zip(a, b):
        for key in ("loss", "kl", "rewards/chosen"):
            assert y[key] == pytest.approx(x[key], abs=1e-5), (x["step"], key)
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-4), x["step"]


@needs_torchrun
def test_online_dpo_two_processes_equal_one_process(tiny_model_dir, script, tmp_path):
    """train --online under 2 DDP processes: each samples and judges its own micro-batch of the step's prompts, and
    answer j of a prompt at step s comes from a stream keyed by (seed, s, prompt), so 2 processes × 2 prompts draw
    the answers one process draws for 4, and train the same: losses and gradient norms at 1e-5, and the logged
    pair and tie counts are the global batch's (rank 0's alone were logged before: 2 pairs where one process
    logged 4)."""
    from helpers import make_pairs

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p["prompt"]}) + "\n" for p in make_pairs(12, seed=5)))
    judge = tmp_path / "judge.py"
    judge.write_text("def score(prompt, answer):\n    return float(sum(map(ord, answer)) % 101)\n")
    kw = dict(online="true", max_steps=3, max_new_tokens=8, learning_rate=1e-3, lr_scheduler="constant",
              warmup_ratio=0.0, beta=0.1, max_length=64, max_prompt_length=32, seed=3, progress="false")
    one, two = tmp_path / "one", tmp_path / "two"
    argv = ["train", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--judge", f"{judge}:score",
            *_flags(kw)]
    assert main([*argv, "--output-dir", str(one), "--batch-size", "4"]) == 0
    res = _launch(script, [*argv, "--output-dir", str(two), "--batch-size", "2"], {})
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = ([r for r in read_metrics(run) if r["split"] == "train"] for run in (one, two))
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
    for x, y in zip(a, b):
        assert y["online/pairs"] == x["online/pairs"] and y["online/ties"] == x["online/ties"], x["step"]
        assert y["loss"] == pytest.approx(x["loss"], abs=1e-5), x["step"]
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-4), x["step"]
