"""preftune.generate and `preftune generate`: batched, left-padded decoding equals a step-by-step loop written
here; seeds reproduce without touching the global RNG; LoRA adapter folders load onto their base. sample_ids:
inverse-CDF draws by hand and against transformers' warpers, answers independent of batching, frequencies that
follow the model's distribution, answers cut at max_new_tokens and at the model's last position."""

from __future__ import annotations

import json

import pytest
import torch

from preftune.cli import main
from preftune.data.prompts import read_prompts
from preftune.errors import PreftuneError
from preftune.generate import (
    Sampling,
    _generation_config,
    encode_prompt,
    generate,
    load_model_for_generation,
    max_positions,
    pick_tokens,
    prompt_text,
    sample_completions,
    sample_ids,
    stop_ids,
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


# ------------------------------------------------------------------ sample_ids: K answers, independent of batching


def test_pick_tokens_inverse_cdf_by_hand():
    """probs [0.1, 0.2, 0.7]: intervals [0, .1) [.1, .3) [.3, 1) in vocabulary order.
    temperature 2: p^(1/2) = [.3162, .4472, .8367] / 1.6001 = [.1976, .2795, .5229] → [0, .1976) [.1976, .4771) ...
    top_p 0.75: transformers drops tokens whose ascending cumulative mass is <= 0.25 (only 0.1): [0, .2/.9) [.2222, 1)
    top_k 1: only the 0.7 token."""
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.7]])).expand(4, 3)
    u = torch.tensor([0.05, 0.25, 0.31, 0.999], dtype=torch.float64)
    assert pick_tokens(logits, u, Sampling()).tolist() == [0, 1, 2, 2]
    u = torch.tensor([0.19, 0.2, 0.47, 0.48], dtype=torch.float64)
    assert pick_tokens(logits, u, Sampling(temperature=2.0)).tolist() == [0, 1, 1, 2]
    u = torch.tensor([0.0, 0.2, 0.23, 0.9], dtype=torch.float64)
    assert pick_tokens(logits, u, Sampling(top_p=0.75)).tolist() == [1, 1, 2, 2]
    assert pick_tokens(logits, u, Sampling(top_k=1)).tolist() == [2, 2, 2, 2]
    assert pick_tokens(logits, u, Sampling(temperature=0)).tolist() == [2, 2, 2, 2]


def test_pick_tokens_draws_what_transformers_warpers_leave():
    """On a grid of 20,000 uniforms, each token's share equals its probability after transformers' own
    temperature/top-k/top-p warpers (computed here from the library, not from pick_tokens)."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    logits = torch.randn(1, 50) * 2
    n = 20_000
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    for s in (Sampling(temperature=0.7, top_p=0.9), Sampling(temperature=1.3, top_k=7)):
        warped = logits.clone()
        for w in (TemperatureLogitsWarper(s.temperature), TopKLogitsWarper(s.top_k) if s.top_k else None,
                  TopPLogitsWarper(s.top_p) if s.top_p < 1 else None):
            warped = w(None, warped) if w is not None else warped
        expected = torch.softmax(warped, -1)[0]
        got = torch.bincount(pick_tokens(logits.expand(n, 50), u, s), minlength=50).double() / n
        assert torch.allclose(got, expected.double(), atol=1.5 / n)


def test_samples_do_not_depend_on_batching_and_greedy_equals_a_loop(loaded):
    """16 of the 400 tokens end an answer here, so answers end at different steps and leave the batch early."""
    model, tok = loaded
    ids = [encode_prompt(tok, p) for p in PROMPTS]
    s = Sampling(max_new_tokens=16, temperature=1.0, seed=5)
    kw = dict(eos_ids=set(range(0, 400, 25)), pad_id=tok.pad_token_id)
    together = sample_ids(model, ids, samples=4, sampling=s, batch_size=12, **kw)  # one batch of 3 prompts x 4
    alone = [sample_ids(model, [ids[i]], samples=4, sampling=s, keys=[i], batch_size=1, **kw)[0] for i in (2, 0, 1)]
    assert [alone[1], alone[2], alone[0]] == together
    ends = [(stopped, len(a)) for answers in together for a, stopped in answers]
    assert {stopped for stopped, _ in ends} == {True, False} and len({n for _, n in ends}) > 3
    assert len({tuple(a) for answers in together for a, _ in answers}) == 12  # twelve different streams
    assert sample_ids(model, ids, samples=4, sampling=Sampling(max_new_tokens=16, seed=6), **kw) != together
    greedy = sample_completions(model, tok, ids, samples=1, sampling=Sampling(max_new_tokens=12, temperature=0))
    assert [g[0].ids for g in greedy] == [_greedy_by_hand(model, tok, p, 12) for p in PROMPTS]


def test_sampling_follows_the_models_distribution(loaded):
    """3,000 one-token answers of one prompt (its cache shared by all): each token's frequency within 4.5
    standard errors of softmax(logits / 0.8) from a plain forward."""
    model, tok = loaded
    ids = encode_prompt(tok, PROMPTS[0])
    n = 3000
    out = sample_ids(model, [ids], samples=n, sampling=Sampling(max_new_tokens=1, temperature=0.8, seed=1),
                     eos_ids=stop_ids(model, tok), pad_id=tok.pad_token_id, batch_size=n)[0]
    with torch.no_grad():
        p = torch.softmax(model(torch.tensor([ids])).logits[0, -1].double() / 0.8, -1)
    freq = torch.bincount(torch.tensor([a[0] for a, _ in out]), minlength=p.numel()).double() / n
    assert torch.all((freq - p).abs() <= 4.5 * torch.sqrt(p * (1 - p) / n) + 1e-3)


def test_answers_stop_at_max_new_tokens_and_at_the_last_position(loaded):
    """The tiny model has 256 positions: a 250-token prompt leaves room for 6 answer tokens, a 256-token one
    for none; the others stop at max_new_tokens (or at EOS, which then ends the ids)."""
    model, tok = loaded
    assert max_positions(model) == 256
    eos = stop_ids(model, tok)
    prompts = [[5] * 250, [5] * 256, encode_prompt(tok, PROMPTS[0])]
    out = sample_ids(model, prompts, samples=2, sampling=Sampling(max_new_tokens=20, seed=2), eos_ids=eos,
                     pad_id=tok.pad_token_id, limit=256)
    assert out[1] == []
    for ids, stopped in out[0]:
        assert (len(ids), stopped) == (6, False) or (stopped and len(ids) <= 6 and ids[-1] in eos)
    for ids, stopped in out[2]:
        assert (len(ids) == 20 and not stopped) or (stopped and ids[-1] in eos and len(ids) <= 20)
