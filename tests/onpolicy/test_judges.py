"""The Python-function judges (pointwise, pairwise) and the reward-model judge: scores worked out by hand or by a
plain forward, and every way a judge can misbehave as one sentence naming the judge and the prompt's line."""

from __future__ import annotations

import time

import pytest
import torch

from preftune.errors import PreftuneError
from preftune.onpolicy.judges import Group, PairwiseJudge, PointwiseJudge, coin, function_judge
from preftune.onpolicy.reward_model import RewardModelJudge, check_reward_model

WHERE = "prompts.jsonl line 7"


def _groups(*answers: list[str]) -> list[Group]:
    return [Group("q", list(a), WHERE, key) for key, a in enumerate(answers)]


def test_pointwise_and_pairwise_scores():
    judge = function_judge(lambda prompt, answer: len(answer.split()))
    assert isinstance(judge, PointwiseJudge)
    assert judge.score(_groups(["a b", "a", "a b c"], ["x y"])) == [[2.0, 1.0, 3.0], [2.0]]

    # Pairwise: the shorter answer wins, equal lengths tie. Answers of 3, 1, 3 and 2 words:
    # 0 v 1: 1 wins; 0 v 2: tie; 0 v 3: 3 wins; 1 v 2: 1; 1 v 3: 1; 2 v 3: 3 → points 0.5, 3, 0.5, 2.
    def shorter(prompt, a, b):
        la, lb = len(a.split()), len(b.split())
        return "a" if la < lb else "b" if lb < la else "TIE "  # case and spaces are forgiven

    judge = function_judge(shorter, seed=3)
    assert isinstance(judge, PairwiseJudge)
    assert judge.score(_groups(["a b c", "a", "x y z", "a b"])) == [[0.5, 3.0, 0.5, 2.0]]
    # whichever side the coin shows each answer on: a judge that always says "a" gives position-only points
    first = function_judge(lambda p, a, b: "a", seed=3).score(_groups(["1", "2", "3", "4"]))[0]
    expected = [0.0] * 4
    for i in range(4):
        for j in range(i + 1, 4):
            expected[i if coin(3, 0, i, j) else j] += 1
    assert first == expected and sum(first) == 6


def test_a_judge_is_pointwise_or_pairwise_by_its_arguments(tmp_path):
    (tmp_path / "j.py").write_text("def both(prompt, a, b=None):\n    return 1.0\n"
                                   "def none(prompt):\n    return 1.0\n")
    with pytest.raises(PreftuneError, match="can be called with 2 or 3 arguments; pass --judge-type"):
        function_judge(f"{tmp_path}/j.py:both")
    assert isinstance(function_judge(f"{tmp_path}/j.py:both", judge_type="pointwise"), PointwiseJudge)
    with pytest.raises(PreftuneError, match="cannot be called as score\\(prompt, answer\\)"):
        function_judge(f"{tmp_path}/j.py:none")
    with pytest.raises(PreftuneError, match="the judge file .*missing.py does not exist"):
        function_judge(f"{tmp_path}/missing.py:score")


@pytest.mark.parametrize("returned, shown", [
    (float("nan"), "nan"), (None, "None"), ("0.5", "'0.5'"), (True, "True"), ([1.0], "[1.0]"),
    ("x" * 100_000_000, "'" + "x" * 27 + "..." + "x" * 28 + "'")])  # 100 MB shown by 60 characters
def test_a_pointwise_judge_must_return_a_finite_number(returned, shown):
    judge = function_judge(lambda prompt, answer: returned, timeout=5)
    with pytest.raises(PreftuneError) as e:
        judge.score(_groups(["a", "b"]))
    assert str(e.value) == (f"the judge {judge.name} returned {shown} for an answer to the prompt at {WHERE}; a "
                            "pointwise judge returns a finite number (higher is better).")
    assert len(str(e.value)) < 300


def test_a_judge_that_raises_or_hangs():
    def broken(prompt, answer):
        raise ValueError("no such article\nsecond line")

    with pytest.raises(PreftuneError, match=f"raised ValueError: no such article on the prompt at {WHERE}.$"):
        function_judge(broken).score(_groups(["a", "b"]))
    judge = function_judge(lambda prompt, answer: time.sleep(3) or 1.0, timeout=0.2)
    start = time.perf_counter()
    with pytest.raises(PreftuneError, match=f"gave no answer within 0.2 s on the prompt at {WHERE}; raise "
                                            "--judge-timeout"):
        judge.score(_groups(["a", "b"]))
    assert time.perf_counter() - start < 2
    with pytest.raises(PreftuneError, match="returned 'both' for two answers to the prompt at"):
        function_judge(lambda p, a, b: "both").score(_groups(["a", "b"]))


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory, tiny_model_dir):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    folder = tmp_path_factory.mktemp("rm")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = ("{% for m in messages %}<s>{{ m.role }}: {{ m.content }}\n{% endfor %}")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, num_labels=1,
                      pad_token_id=tok.pad_token_id)
    LlamaForSequenceClassification(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_reward_model_scores_each_text_as_a_plain_forward(reward_model_dir):
    """Batches of 2 (padded) give each answer the score of a forward of its chat-rendered text alone; a text past
    the model's 64 positions is cut from the left."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    judge = RewardModelJudge(str(reward_model_dir), device="cpu", batch_size=2)
    long = "red cat " * 60
    groups = [Group("question: sun answer:", [" yes good", " no bad red", long], WHERE, 0),
              Group([{"role": "user", "content": "hi"}], [" yes", " no"], WHERE, 1)]
    scores = judge.score(groups)
    model = AutoModelForSequenceClassification.from_pretrained(reward_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(reward_model_dir)
    for g, row in zip(groups, scores):
        for answer, got in zip(g.answers, row):
            turns = [{"role": "user", "content": g.prompt}] if isinstance(g.prompt, str) else g.prompt
            text = f"<s>{turns[0]['role']}: {turns[0]['content']}\n<s>assistant: {answer}\n"
            ids = tok(text, add_special_tokens=False)["input_ids"][-64:]
            with torch.no_grad():
                want = float(model(torch.tensor([ids])).logits[0, 0])
            assert got == pytest.approx(want, abs=1e-5)
    assert judge.truncated == 1


def test_a_reward_model_has_one_output(tmp_path, tiny_model_dir):
    import json

    for labels, archs, match in ((3, ["LlamaForSequenceClassification"], "has 3 outputs \\(num_labels\\)"),
                                 (2, ["LlamaForCausalLM"], "is a causal language model")):
        folder = tmp_path / f"m{labels}"
        folder.mkdir()
        cfg = json.loads((tiny_model_dir / "config.json").read_text())
        cfg.update(architectures=archs, id2label={str(i): str(i) for i in range(labels)})
        (folder / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(PreftuneError, match=match):
            check_reward_model(str(folder))
