"""preftune.generate and `preftune generate`: batched, left-padded decoding equals a step-by-step loop written
here; seeds reproduce without touching the global RNG; LoRA adapter folders load onto their base."""

from __future__ import annotations

import json

import pytest
import torch

from preftune.cli import main
from preftune.errors import PreftuneError
from preftune.generate import (
    _generation_config,
    generate,
    load_model_for_generation,
    prompt_text,
    read_prompts,
)

PROMPTS = ["question: red cat answer:", "question: one two three four five six seven eight answer:",
           "question: sun answer:"]


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model_for_generation(str(tiny_model_dir), device="cpu")


def _greedy_by_hand(model, tokenizer, prompt: str, n: int) -> list[int]:
    """Argmax one token at a time over the whole sequence, no cache, no padding."""
    ids = tokenizer(prompt)["input_ids"]
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
            out.append(nxt)
            if nxt == tokenizer.eos_token_id:
                break
    return out


def test_greedy_batch_equals_step_by_step_loop(loaded):
    model, tok = loaded
    outs = generate(model, tok, PROMPTS, max_new_tokens=12, batch_size=3)  # one left-padded batch
    for prompt, out in zip(PROMPTS, outs):
        assert out.ids == _greedy_by_hand(model, tok, prompt, 12)
        assert out.text == tok.decode(out.ids, skip_special_tokens=True)
        assert out.stopped == (out.ids[-1] == tok.eos_token_id)


def test_seeded_sampling_reproduces_and_leaves_global_rng(loaded):
    model, tok = loaded
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = generate(model, tok, PROMPTS, max_new_tokens=10, temperature=1.0, seed=7, pure=True)
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(999)  # another global state: the same seed still gives the same samples
    b = generate(model, tok, PROMPTS, max_new_tokens=10, temperature=1.0, seed=7, pure=True)
    c = generate(model, tok, PROMPTS, max_new_tokens=10, temperature=1.0, seed=8, pure=True)
    assert [o.ids for o in a] == [o.ids for o in b]
    assert [o.ids for o in a] != [o.ids for o in c]


def test_pure_sampling_neutralises_the_models_generation_config(loaded):
    model, tok = loaded
    model = type("M", (), {"generation_config": model.generation_config.__class__(
        repetition_penalty=1.3, min_new_tokens=5, top_k=50, no_repeat_ngram_size=2)})()
    pure, eos = _generation_config(model, tok, max_new_tokens=8, temperature=1.0, top_p=1.0, top_k=0, pure=True)
    assert (pure.repetition_penalty, pure.min_new_tokens, pure.top_k, pure.no_repeat_ngram_size) == (1.0, None, 0, 0)
    assert pure.do_sample and pure.temperature == 1.0 and eos == {tok.eos_token_id}
    kept, _ = _generation_config(model, tok, max_new_tokens=8, temperature=0.0, top_p=1.0, top_k=0, pure=False)
    assert kept.repetition_penalty == 1.3 and not kept.do_sample


def test_chat_prompts_use_the_template(loaded):
    _, tok = loaded
    assert prompt_text(tok, "hi", chat=True) == "hi"  # no template: plain text
    tok = tok.__class__.from_pretrained(tok.name_or_path)
    tok.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}" \
                        "{% if add_generation_prompt %}<assistant>{% endif %}"
    assert prompt_text(tok, "hi", chat=True) == "<user>hi<assistant>"
    assert prompt_text(tok, "hi") == "hi"
    assert prompt_text(tok, [{"role": "user", "content": "yo"}]) == "<user>yo<assistant>"


def test_lora_adapter_folder_loads_onto_its_base(tmp_path, tiny_model_dir):
    from preftune.modeling.load import add_lora, load_model

    torch.manual_seed(0)
    peft_model = add_lora(load_model(str(tiny_model_dir)), r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # B starts at zero: make the adapters change the model
    peft_model.save_pretrained(tmp_path / "adapter")
    model, tok = load_model_for_generation(str(tmp_path / "adapter"), device="cpu")  # tokenizer from the base
    x = torch.tensor([tok(PROMPTS[0])["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(model(x).logits, peft_model(x).logits, atol=1e-5)
        with model.disable_adapter():
            base = load_model(str(tiny_model_dir))
            assert torch.allclose(model(x).logits, base(x).logits, atol=1e-5)
        assert not torch.allclose(model(x).logits, base(x).logits, atol=1e-3)

    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tmp_path / "gone")
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(PreftuneError, match="does not exist here; pass the base model"):
        load_model_for_generation(str(tmp_path / "adapter"))


def test_read_prompts(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"prompt": "a", "chosen": "x"}\n{"prompt": [{"role": "user", "content": "b"}]}\n')
    assert read_prompts(tmp_path / "p.jsonl") == ["a", [{"role": "user", "content": "b"}]]
    (tmp_path / "p.txt").write_text("one\n\ntwo\n")
    assert read_prompts(tmp_path / "p.txt") == ["one", "two"]
    (tmp_path / "q.jsonl").write_text('{"question": "a"}\n')
    with pytest.raises(PreftuneError, match="row 1 of .* has no 'prompt' text"):
        read_prompts(tmp_path / "q.jsonl")


def test_cli_generate_writes_jsonl(tmp_path, tiny_model_dir, capsys):
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--model", str(tiny_model_dir), "--data", str(tmp_path / "p.txt"), "--output", str(out),
                 "--max-new-tokens", "6", "--device", "cpu"]) == 0
    rows = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == PROMPTS
    assert all(r["finish_reason"] in ("stop", "length") and 0 <= r["tokens"] <= 6 for r in rows)
    assert main(["generate", "--model", str(tiny_model_dir), "--prompt", "x", "--max-new-tokens", "0"]) == 2
    assert capsys.readouterr().err.strip().endswith("max_new_tokens must be at least 1 (got 0).")  # the CLI's schema
