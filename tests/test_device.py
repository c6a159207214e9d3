"""Device-dependent speed choices: the forward plan and its probe, the LM-head chunk size, the speed config keys,
and the CPU thread policy (its arithmetic on fed numbers: no timing)."""

from __future__ import annotations

import copy

import pytest
import torch

from preftune import device, logprobs, packing
from preftune.config import TrainConfig
from preftune.device import ForwardOptions
from preftune.errors import PreftuneError
from preftune.logprobs import ForwardPlan
from preftune.modeling.load import load_model_and_tokenizer


@pytest.mark.parametrize("vocab, chunk", [
    (8192, 4096),      # 256 MiB / (4 B x 8192) = 8192 tokens, capped at 4096
    (128256, 512),     # 256 MiB / (4 B x 128256) = 523 → 512
    (151936, 256),     # 256 MiB / (4 B x 151936) = 441 → 256
    (2**22, 128),      # 16 tokens would fit; never below 128
])
def test_chunk_size_for_vocab(vocab, chunk):
    assert device.chunk_size_for(vocab) == chunk


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model, _ = load_model_and_tokenizer(str(tiny_model_dir))
    return model


def test_cpu_plan_is_packed_pair_rows(tiny):
    plan = device.plan_forward(tiny, "cpu", options=ForwardOptions.of(TrainConfig()))
    assert (plan.path, plan.rows, plan.attention) == ("packed", "pair", "sdpa")
    assert plan.chunk_size == 4096  # tiny vocab: the cap
    assert plan.keep_logits_mib == device.CPU_KEEP_LOGITS_MIB and plan.optimizer_kwargs == {}
    assert plan.description.startswith("speed: packed prefix sharing (prompt·chosen·rejected as one sequence, "
                                       "one pair per row, sdpa 4D mask)")
    assert "activation checkpointing off" in plan.description
    assert not plan.keep_dropout  # disable_dropout defaults to true


def test_an_sft_speed_line_says_what_runs_for_one_answer():
    """SFT examples have no second answer to share a prompt with: the line names prompt·completion rows."""
    cpu = torch.device("cpu")
    packed = ForwardPlan("packed", 4096, 256, "pair", "sdpa")
    assert device.describe(packed, False, cpu, sft=True).startswith(
        "speed: packed rows (prompt·completion as one sequence, one example per row, sdpa 4D mask), LM head")
    assert device.describe(ForwardPlan("cache"), False, cpu, sft=True).startswith(
        "speed: KV cache (the completion continues from the prompt's), full logits")
    assert device.describe(ForwardPlan("off"), False, cpu, sft=True).startswith(
        "speed: plain rows (prompt·completion, one row per example)")
    assert "prompt·chosen·rejected" in device.describe(packed, False, cpu)


@pytest.mark.parametrize("kw, mode, chunk", [
    (dict(prefix_sharing=False, logits_chunk_size=0), "off", 0),
    (dict(prefix_sharing="cache", logits_chunk_size=512), "cache", 512),
    (dict(prefix_sharing="cache", gradient_checkpointing=True), "off", 4096),  # the cache cannot be checkpointed
    (dict(prefix_sharing=True, gradient_checkpointing=True), "packed", 4096),  # packing can
])
def test_plan_follows_explicit_settings(tiny, kw, mode, chunk):
    cfg = TrainConfig(**kw)
    plan = device.plan_forward(tiny, "cpu", options=ForwardOptions.of(cfg), checkpointing=cfg.gradient_checkpointing)
    assert (plan.path, plan.chunk_size) == (mode, chunk)


def test_model_ignoring_the_mask_falls_back(tiny, monkeypatch, caplog):
    """A model that ignores the custom mask (simulated: the mask lets rejected tokens see the chosen ones)
    gives different log-probs on the probe, so the plan falls back to the KV cache, and says so once."""
    def leaky(p, additive_dtype=None):
        n = p.kind.shape[1]
        return torch.ones(n, n, dtype=torch.bool).tril().expand(p.kind.shape[0], 1, n, n)

    probe = device.probe_model(tiny, torch.device("cpu"))
    assert device.path_matches_plain(probe, "packed", torch.device("cpu")) is None
    monkeypatch.setattr(packing, "dense_mask", leaky)
    assert "differ from the plain path's" in device.path_matches_plain(probe, "packed", torch.device("cpu"))
    logprobs._said.clear()
    with caplog.at_level("WARNING", logger="preftune"):
        assert device.plan_forward(tiny, "cpu").path == "cache"
        assert device.plan_forward(tiny, "cpu").path == "cache"
    assert sum("packed prefix sharing is off for this model" in r.message for r in caplog.records) == 1


def test_probe_model_is_a_small_seeded_copy_that_leaves_the_run_rng_alone(tiny):
    """Two layers, the same class and attention, a 256-token vocabulary, fp32 whatever the model's precision, the
    same weights every time (every process of a sharded launch decides alike), and the global random stream as
    it was (LoRA's initialisation and the data order come from it)."""
    torch.manual_seed(5)
    before = torch.rand(1)
    torch.manual_seed(5)
    probe = device.probe_model(tiny, torch.device("cpu"))
    assert torch.rand(1) == before
    again = device.probe_model(tiny, torch.device("cpu"))
    assert type(probe) is type(tiny) and probe.config.num_hidden_layers == 2 and probe.config.vocab_size == 256
    assert probe.config._attn_implementation == "sdpa" and tiny.config.num_hidden_layers == 2
    assert all(torch.equal(a, b) for a, b in zip(probe.parameters(), again.parameters()))
    assert not probe.training and next(probe.parameters()).dtype == torch.float32
    assert next(device.probe_model(copy.deepcopy(tiny).bfloat16(), torch.device("cpu")).parameters()).dtype == \
        torch.float32


def test_half_precision_models_are_probed_in_fp32():
    """A bf16 MPT's packed rows are off by 0.0058 per token (ALiBi counts key columns), below bf16's own rounding
    tolerance (2e-2): a probe in bf16 would take the packed path; the fp32 probe sees it and takes the KV cache."""
    from architectures import build

    assert device.plan_forward(build("mpt").bfloat16(), "cpu").path == "cache"


def test_training_probe_runs_backward_and_discards_gradients(tiny):
    """The check run before FlexAttention is trusted for training (here through sdpa): it must pass on a
    model that trains, and leave no gradients or mode change behind."""
    tiny.eval()
    assert device.packed_trains(tiny, torch.device("cpu"), rows="pair") is None
    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    assert device.packed_trains(tiny, torch.device("cpu"), bf16, rows="pair") is None  # under the run's autocast
    assert all(p.grad is None for p in tiny.parameters()) and not tiny.training


@pytest.mark.parametrize("kw, msg", [
    (dict(prefix_sharing="packd"), "did you mean 'packed'"),
    (dict(logits_chunk_size=-1), "logits_chunk_size must be auto or a whole number"),
    (dict(logits_chunk_size="big"), "logits_chunk_size must be auto"),
])
def test_speed_keys_refuse_bad_values(kw, msg):
    with pytest.raises(PreftuneError, match=msg):
        TrainConfig(**kw)


def test_forward_options_refuse_an_unknown_path():
    with pytest.raises(ValueError, match="prefix_sharing must be auto, packed, cache, off"):
        ForwardOptions("fast")
    assert ForwardOptions(True).prefix_sharing == "auto" and ForwardOptions(False).prefix_sharing == "off"


def test_speed_keys_accept_old_and_new_values():
    assert TrainConfig(prefix_sharing=True).prefix_sharing == "auto"
    assert TrainConfig(prefix_sharing=False).prefix_sharing == "off"
    assert TrainConfig(prefix_sharing="cache").prefix_sharing == "cache"
    assert TrainConfig(logits_chunk_size="512").logits_chunk_size == 512
    assert TrainConfig().logits_chunk_size == "auto"


@pytest.mark.parametrize("others, cores, threads", [
    (0.0, 2, 2),    # quiet machine: every core
    (0.2, 2, 2),    # a little background noise still leaves both: int(2 - 0.2 + 0.3) = 2
    (0.5, 2, 1),    # half a core taken: int(1.8) = 1
    (1.9, 2, 1),    # both busy: never below one
    (2.0, 16, 14),  # int(16 - 2 + 0.3) = 14
])
def test_threads_for_free_cores(others, cores, threads):
    assert device._threads_for(others, cores) == threads


def test_governor_counts_only_other_processes(monkeypatch):
    """Over 2 s on 2 cores the machine was busy 300 of 400 jiffies (1.5 cores) while this process used
    2 CPU-seconds (1 core), so others used 0.5 core → 1 thread."""
    clock = {"t": 100.0, "cpu": 10.0, "jiffies": (1000.0, 4000.0)}
    monkeypatch.setattr(device, "_cores", lambda: 2)
    monkeypatch.setattr(device, "_busy_jiffies", lambda: clock["jiffies"])
    monkeypatch.setattr(device.time, "monotonic", lambda: clock["t"])
    monkeypatch.setattr(device.time, "process_time", lambda: clock["cpu"])
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    threads = {"n": 2}
    monkeypatch.setattr(device.torch, "get_num_threads", lambda: threads["n"])
    monkeypatch.setattr(device.torch, "set_num_threads", lambda n: threads.update(n=n))
    gov = device.ThreadGovernor(interval=2.0)
    assert gov.active
    clock.update(t=101.0)
    assert gov.update() == 2  # under the 2 s interval: no decision yet
    clock.update(t=102.0, cpu=12.0, jiffies=(1300.0, 4400.0))
    assert gov.other_busy_cores() == pytest.approx(0.5)
    assert gov.update() == 1 and threads["n"] == 1
    clock.update(t=104.0, cpu=14.0, jiffies=(1500.0, 4800.0))  # 200 of 400 busy, all ours: quiet again
    assert gov.update() == 2 and threads["n"] == 2


def test_governor_leaves_pinned_threads_alone(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    gov = device.ThreadGovernor()
    assert not gov.active
    before = torch.get_num_threads()
    assert gov.update(force=True) == before
