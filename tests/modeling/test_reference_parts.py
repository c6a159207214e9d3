"""The reference strategies' small parts: what `auto` means, what identifies a model folder, cached
log-probs looked up by position, and the live strategies leaving the policy as they found it."""

from __future__ import annotations

import os

import torch

from preftune.data.collate import collate
from preftune.data.tokenize import TokenizedPair
from preftune.logprobs import ForwardPlan, LogpsModel
from preftune.modeling.reference import Precomputed, choose_strategy, model_identity, precompute


def test_auto_means_precomputed_and_reference_free_means_none():
    assert choose_strategy("auto", needs_reference=True) == "precomputed"
    assert choose_strategy("copy", needs_reference=True) == "copy"
    assert choose_strategy("lora_disabled", needs_reference=True) == "lora_disabled"
    assert choose_strategy("auto", needs_reference=False) == "none"
    assert choose_strategy("copy", needs_reference=False) == "none"


def test_model_identity_follows_the_weight_files(tmp_path):
    """A hub name is itself; a folder is its weight/config files' names with their sizes, times and content
    samples, not its path (a moved folder is the same model): rewriting a weight file (new size, or only a new
    mtime) changes it, an unrelated file does not."""
    assert model_identity("org/model") == "org/model"
    (tmp_path / "model.safetensors").write_bytes(b"12345")
    (tmp_path / "config.json").write_text("{}")
    first = model_identity(str(tmp_path))
    assert str(tmp_path.resolve()) not in first and "model.safetensors" in first and "config.json" in first
    (tmp_path / "notes.txt").write_text("not a weight file")
    assert model_identity(str(tmp_path)) == first
    (tmp_path / "model.safetensors").write_bytes(b"123456")
    second = model_identity(str(tmp_path))
    assert second != first
    st = (tmp_path / "model.safetensors").stat()
    os.utime(tmp_path / "model.safetensors", (st.st_atime, st.st_mtime + 10))
    assert model_identity(str(tmp_path)) != second
    (tmp_path / "extra.bin").write_bytes(b"x")  # a pickle beside safetensors is never loaded (modeling/load.py)
    assert "extra.bin" not in model_identity(str(tmp_path))
    (tmp_path / "model.safetensors").unlink()  # ... unless it is all there is
    assert "extra.bin" in model_identity(str(tmp_path))


def test_precomputed_looks_up_by_dataset_position():
    """Cached chosen [10, 11, 12], rejected [20, 21, 22]; a batch of positions [2, 0] gets [12, 10] / [22, 20], and
    the answer lengths of the batch itself (3, 1 and 2, 2)."""
    ref = Precomputed(torch.tensor([10.0, 11.0, 12.0]), torch.tensor([20.0, 21.0, 22.0]))
    pairs = [TokenizedPair([1], [2, 3, 4], [5, 6], 2), TokenizedPair([1], [7], [8, 9], 0)]
    out = ref.logps(collate(pairs, [2, 0], pad_id=0))
    assert out.chosen_logps.tolist() == [12.0, 10.0] and out.rejected_logps.tolist() == [22.0, 20.0]
    assert out.chosen_lengths.tolist() == [3.0, 1.0] and out.rejected_lengths.tolist() == [2.0, 2.0]


def test_cache_of_another_size_is_recomputed(tmp_path, monkeypatch):
    """A cache file written for 1 pair is not reused for 2 pairs; one of the right size is read back, not
    scored again. The scorer is a stub giving each answer -(its token count): -3, -1 / -2, -2."""
    from preftune.logprobs import SequenceLogps
    from preftune.modeling import precomputed

    calls = []

    def fake_score(model, pairs, **kw):
        calls.append(len(pairs))
        n = torch.tensor([float(len(p.chosen_ids)) for p in pairs])
        r = torch.tensor([float(len(p.rejected_ids)) for p in pairs])
        return SequenceLogps(-n, n, -r, r)

    monkeypatch.setattr(precomputed, "score", fake_score)
    cache = tmp_path / "run" / "ref" / "train-key.safetensors"  # folders made as needed
    one = [TokenizedPair([1], [2, 3, 4], [5, 6], 0)]
    two = one + [TokenizedPair([1], [7], [8, 9], 1)]
    kw = dict(cache_file=cache, pad_id=0, batch_size=2)
    precompute(torch.nn.Linear(1, 1), one, **kw)
    got = precompute(torch.nn.Linear(1, 1), two, **kw)
    assert calls == [1, 2]
    assert got.chosen.tolist() == [-3.0, -1.0] and got.rejected.tolist() == [-2.0, -2.0]
    again = precompute(torch.nn.Linear(1, 1), two, **kw)
    assert calls == [1, 2] and again.chosen.tolist() == [-3.0, -1.0]
    assert not list(cache.parent.glob("*.tmp"))  # written through a temporary file, renamed into place
    other = tmp_path / "other.safetensors"
    not_saved = precompute(torch.nn.Linear(1, 1), two, **{**kw, "cache_file": other}, save=False)
    assert not_saved.chosen.tolist() == [-3.0, -1.0] and not_saved.rejected.tolist() == [-2.0, -2.0]
    assert not other.exists()  # another process of the job writes it


def test_precompute_scores_the_base_weights_under_adapters(tiny_model_dir, tmp_path):
    """A PeftModel whose adapters are not zero (init_lora_weights=False) is scored with them switched off:
    the cached log-probs equal the plain model's, to fp32 rounding (same forward, same batches: ~1e-6)."""
    import copy

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                           init_lora_weights=False))
    pairs = [TokenizedPair([5, 6, 7], [8, 9, 2], [10, 2], 0), TokenizedPair([5], [11, 2], [12, 13, 2], 1)]
    kw = dict(pad_id=3, batch_size=2)
    plan = ForwardPlan("packed", attention="sdpa")
    got = precompute(LogpsModel(peft, plan), pairs, cache_file=tmp_path / "a.safetensors", **kw)
    want = precompute(LogpsModel(base, plan), pairs, cache_file=tmp_path / "b.safetensors", **kw)
    torch.testing.assert_close(got.chosen, want.chosen, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.rejected, want.rejected, atol=1e-5, rtol=0)
    assert (got.chosen - precompute(LogpsModel(peft.merge_and_unload(), plan), pairs,
                                    cache_file=tmp_path / "c.safetensors", **kw).chosen).abs().max() > 1e-3  # the adapters do change the scores


def test_live_references_score_in_eval_mode_and_give_the_policy_its_mode_back():
    """--lora, --reference lora_disabled (and copy) with dropout kept on (disable_dropout: false) in a Llama whose
    attention_dropout is 0.5: the policy trains in training mode, yet two reference calls give the same
    log-probs, those of the base model in eval mode, and the policy is still in training mode afterwards."""
    import copy

    from architectures import build
    from peft import LoraConfig, get_peft_model

    from preftune.modeling.reference import DisabledAdapters, FrozenModel

    base = build("llama")
    peft = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                          lora_dropout=0.5, init_lora_weights=False))
    keep = ForwardPlan("off", keep_dropout=True)
    policy = LogpsModel(peft, keep).train()
    batch = collate([TokenizedPair([5, 6, 7], [8, 9, 2], [10, 2], 0), TokenizedPair([5], [11, 2], [12, 13, 2], 1)],
                    [0, 1], pad_id=3)
    with torch.no_grad():
        assert not torch.equal(policy(batch).chosen_logps, policy(batch).chosen_logps)  # dropout is on in training
        want = LogpsModel(base.eval(), keep)(batch)
    for ref in (DisabledAdapters(policy), FrozenModel(LogpsModel(copy.deepcopy(peft), keep).train())):
        first, second = ref.logps(batch), ref.logps(batch)
        torch.testing.assert_close(first.chosen_logps, want.chosen_logps, atol=1e-5, rtol=0)
        assert torch.equal(first.rejected_logps, second.rejected_logps)
        assert policy.training and all(m.training for m in peft.modules())
