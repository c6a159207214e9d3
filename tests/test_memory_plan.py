"""`preftune plan`: parameter counts from a config alone, the per-GPU estimates, the smallest setup that fits.

The model: a Llama with hidden 64, intermediate 128, 2 layers, 4 heads (no GQA), vocab 100, untied head.
    embeddings 100·64 = 6,400; per layer q,k,v,o 4·64·64 = 16,384 + MLP 3·64·128 = 24,576 + 2 norms 128 = 41,088;
    final norm 64; head 6,400 → P = 6,400 + 2·41,088 + 64 + 6,400 = 95,040; outside the layers 12,864.
    LoRA r=16 per layer: q,k,v,o 4·16·(64+64) = 8,192, gate/up 2·16·(64+128) = 6,144, down 16·(128+64) = 3,072
    → 17,408 · 2 layers = 34,816.
"""

from __future__ import annotations

import json

import pytest

from preftune.errors import PreftuneError
from preftune.memory_plan import GB, OVERHEAD, Setup, estimate, load_shape, parse_memory, smallest_fit

CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 100,
          "tie_word_embeddings": False}
P = 95_040


@pytest.fixture
def config_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    return tmp_path


def test_shape_counts_parameters_from_the_config_alone(config_dir):
    for source in (config_dir, config_dir / "config.json"):
        s = load_shape(str(source))
        assert (s.params, s.layer_params, s.edge_params, s.lora_params) == (P, 41_088, 12_864, 34_816)
        assert (s.hidden, s.intermediate, s.layers, s.vocab) == (64, 128, 2, 100)


def test_estimates_per_gpu(config_dir):
    """Micro-batch 2 × seq_len 10 → T = 2·2·10 = 40 tokens; per token per layer 13·64 + 4·128 = 1,344 values ×
    2.5 bytes; 2 layers + 1 for backward → 3·40·1,344·2.5 = 403,200; head 40 tokens · 100 · 12 = 48,000."""
    s = load_shape(str(config_dir))
    one = estimate(s, Setup("single", 1, False), batch_size=2, seq_len=10)
    assert (one.weights, one.grads, one.optimizer, one.working) == (4 * P, 4 * P, 8 * P, 2 * P)
    assert one.activations == 403_200 + 48_000
    assert one.total == 18 * P + 451_200 + OVERHEAD  # the step's 4P temporaries < the activations
    fsdp = estimate(s, Setup("fsdp2", 2, False), batch_size=2, seq_len=10)
    # Shards of 16 bytes per parameter over 2; two bf16 layers gathered, the root unit's weights (bf16) and
    # gradients (fp32) unsharded.
    assert (fsdp.weights, fsdp.grads, fsdp.optimizer) == (2 * P, 2 * P, 4 * P)
    assert fsdp.working == 2 * 2 * 41_088 + 12_864 * 6
    lora = estimate(s, Setup("ddp", 2, True), batch_size=2, seq_len=10)
    assert (lora.weights, lora.grads, lora.optimizer) == (2 * P + 4 * 34_816, 4 * 34_816, 8 * 34_816)
    ckpt = estimate(s, Setup("single", 1, False, checkpointing=True), batch_size=2, seq_len=10)
    assert ckpt.activations == 40 * 2 * 64 * 4 + 2 * 40 * 1_344 * 2.5 + 48_000
    off = estimate(s, Setup("fsdp2", 2, False, checkpointing=True, offload=True), batch_size=2, seq_len=10)
    assert off.weights == off.grads == off.optimizer == 0 and off.host == 2 * 8 * P  # both processes' shards


def test_smallest_fit_prefers_fewer_gpus_then_simpler_engines(config_dir):
    s = load_shape(str(config_dir))
    kw = dict(lora=False, max_gpus=128, batch_size=2, seq_len=10)
    roomy = smallest_fit(s, gpu_memory=10 * GB, **kw)
    assert roomy.setup == Setup("single", 1, False)
    # Just too small for one GPU even with checkpointing: FSDP2 over 2 (DDP over 2 needs more per GPU than one
    # GPU: its gradient buckets), and without checkpointing, which sharding makes unnecessary here.
    need_one = estimate(s, Setup("single", 1, False, checkpointing=True), batch_size=2, seq_len=10).total
    tight = smallest_fit(s, gpu_memory=(need_one - 1) / 0.9, **kw)
    assert tight.setup == Setup("fsdp2", 2, False) and tight.total <= need_one - 1


def test_parse_memory():
    assert parse_memory("80GB") == parse_memory("80 GiB") == parse_memory("80") == 80 * GB
    with pytest.raises(PreftuneError):
        parse_memory("lots")


def test_cli_prints_a_plan_and_refuses_a_missing_model(config_dir, capsys):
    from preftune.cli import main

    assert main(["plan", "--model", str(config_dir), "--gpus", "2", "--gpu-memory", "24GB"]) == 0
    out = capsys.readouterr().out
    assert "0.1M parameters" in out and "FSDP2 ×2 + act. ckpt" in out
    assert "smallest setup for full fine-tuning: 1 GPU" in out
    assert main(["plan", "--model", str(config_dir / "nope")]) == 2
    assert "could not read a model config" in capsys.readouterr().err


def test_reference_copy_doubles_the_weights(config_dir, capsys):
    """A frozen reference copy (what TR-DPO's sync_ref_model needs) is placed like the policy's weights: 1 GPU
    4P + 4P; FSDP2 ×2 2P + 2P (sharded); LoRA DDP the bf16 base and adapters twice. Precomputed holds none."""
    from preftune.cli import main

    s = load_shape(str(config_dir))
    for setup, weights in ((Setup("single", 1, False), 8 * P), (Setup("fsdp2", 2, False), 4 * P),
                           (Setup("ddp", 2, True), 2 * (2 * P + 4 * 34_816))):
        plain = estimate(s, setup, batch_size=2, seq_len=10)
        held = estimate(s, setup, batch_size=2, seq_len=10, reference_copy=True)
        assert held.weights == weights and held.total - plain.total == weights / 2
    assert main(["plan", "--model", str(config_dir), "--gpus", "1", "--reference", "copy"]) == 0
    assert "weights include a frozen reference copy" in capsys.readouterr().out
