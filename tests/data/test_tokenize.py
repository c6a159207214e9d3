"""Joint tokenization, one EOS per answer (also after a chat template's EOS), truncation order and dropping;
batch layout."""

from __future__ import annotations

import pytest

from preftune.data.collate import collate
from preftune.data.encode import tokenize_records
from preftune.data.tokenize import TokenizedPair, answer_text, tokenize_texts
from preftune.errors import PreftuneError
from preftune.modeling.load import load_tokenizer


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_tokenizer(str(tiny_model_dir))


def test_prompt_plus_answer_is_the_joint_encoding(tok):
    prompt, chosen, rejected = "question: red cat answer:", " yes good dog", " no bad dog"
    (pair,), stats = tokenize_records(tok, [(prompt, chosen, rejected)], max_length=100, max_prompt_length=50)
    eos = tok.eos_token_id
    assert pair.prompt_ids + pair.chosen_ids == tok(prompt + chosen)["input_ids"] + [eos]
    assert pair.prompt_ids + pair.rejected_ids == tok(prompt + rejected)["input_ids"] + [eos]
    assert pair.chosen_ids[-1] == eos and stats.kept == 1


def test_boundary_merge_moves_into_the_answers(tok):
    """'answer:' + 'x' vs 'answer:x': when BPE merges across the boundary, the prompt keeps only the common
    prefix, so each answer's ids are still exactly what the model sees in prompt+answer."""
    prompt, chosen, rejected = "question: red ans", "wer: yes", "wer: no"
    (pair,), _ = tokenize_records(tok, [(prompt, chosen, rejected)], max_length=100, max_prompt_length=50)
    assert pair.prompt_ids + pair.chosen_ids[:-1] == tok(prompt + chosen)["input_ids"]
    assert pair.prompt_ids + pair.rejected_ids[:-1] == tok(prompt + rejected)["input_ids"]


def test_truncation_prompt_left_then_answers_right(tok):
    """prompt of 20 word-tokens, answers of ~6: max_prompt_length 8 keeps the prompt's last 8 tokens (its end),
    then max_length 12 leaves 4 tokens for each answer, cut on the right (EOS lost)."""
    prompt = "question: " + " ".join(["red"] * 20) + " answer:"
    chosen, rejected = " yes good cat dog bird tree", " no bad cat dog bird tree"
    full_prompt = tok(prompt)["input_ids"]
    (pair,), stats = tokenize_records(tok, [(prompt, chosen, rejected)], max_length=12, max_prompt_length=8)
    assert pair.prompt_ids == full_prompt[-8:]
    assert len(pair.chosen_ids) == 4 and len(pair.rejected_ids) == 4
    assert pair.chosen_ids[-1] != tok.eos_token_id
    assert stats.prompt_truncated == 1 and stats.completion_truncated == 1


def test_empty_answer_is_dropped_and_counted(tok):
    texts = [("question: red answer:", " yes", " no"), ("question: red answer:", "", " no")]
    pairs, stats = tokenize_records(tok, texts, max_length=64, max_prompt_length=32)
    assert [p.index for p in pairs] == [0]
    assert stats.dropped_empty == [1] and "1 dropped" in stats.summary()


def test_tokenizer_without_pad_token_gets_eos_as_pad(tmp_path):
    from helpers import build_tiny_model

    folder = build_tiny_model(tmp_path / "m", pad_token=False)
    tok = load_tokenizer(str(folder))
    assert tok.pad_token_id == tok.eos_token_id


def test_tokenizer_without_eos_is_refused(tok):
    import copy

    t = copy.deepcopy(tok)
    t.eos_token = None
    with pytest.raises(PreftuneError, match="no EOS token"):
        tokenize_records(t, [("a", "b", "c")], max_length=10, max_prompt_length=5)


def test_collate_layout():
    """Prompts left-padded (all end in the last column), answers right-padded; pad id 0 here."""
    pairs = [TokenizedPair([5, 6, 7], [8, 2], [9, 9, 2], 0), TokenizedPair([5], [8, 8, 8, 2], [2], 1)]
    b = collate(pairs, [3, 4], pad_id=0)
    assert b.prompt_ids.tolist() == [[5, 6, 7], [0, 0, 5]]
    assert b.prompt_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert b.chosen_ids.tolist() == [[8, 2, 0, 0], [8, 8, 8, 2]]
    assert b.rejected_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b.indices.tolist() == [3, 4]
    assert b.num_tokens == 3 + 1 + 2 + 4 + 3 + 1


# Real-style chat templates whose assistant turn ends in EOS (as shipped in the models' tokenizer_config.json,
# trimmed to the user/assistant/system roles). transformers renders them with trim_blocks and lstrip_blocks.
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
ZEPHYR = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + "
    "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
)
CONV = {"prompt": [{"role": "user", "content": "red cat"}], "chosen": [{"role": "assistant", "content": "yes good"}],
        "rejected": [{"role": "assistant", "content": "no bad"}]}


def _templated(tok, template: str):
    import copy

    t = copy.deepcopy(tok)
    t.chat_template = template
    return t


@pytest.mark.parametrize("template, prompt, chosen, rejected", [
    # Zephyr: every turn ends "</s>\n"; the "\n" after the answer's "</s>" is never generated, so it is cut
    (ZEPHYR, "<|user|>\nred cat</s>\n<|assistant|>\n", "yes good</s>", "no bad</s>"),
    # Llama-2: "[/INST] answer </s>" with nothing after the EOS
    (LLAMA2, "<s>[INST] red cat [/INST]", " yes good </s>", " no bad </s>"),
], ids=["zephyr", "llama-2"])
def test_template_eos_ends_the_answer_once(tok, template, prompt, chosen, rejected):
    """Before the fix the Zephyr answer was 'yes good</s>\\n' + EOS, i.e. ... </s> Ċ </s>. Now each answer is
    exactly the encoding of the hand-derived text above (one EOS, the template's own)."""
    from preftune.data.render import render_sft_texts, render_texts

    t = _templated(tok, template)
    texts = render_texts(t, CONV)
    assert texts[0] == prompt
    (pair,), stats = tokenize_records(t, [texts], max_length=200, max_prompt_length=100)
    eos = t.eos_token_id
    for answer, ids in ((chosen, pair.chosen_ids), (rejected, pair.rejected_ids)):
        assert pair.prompt_ids + ids == t(prompt + answer, add_special_tokens=False)["input_ids"]
        assert ids[-1] == eos and ids.count(eos) == 1
    assert stats.eos_in_text == 2 and "2 answers already end in EOS (no second EOS added)" in stats.summary()
    # SFT goes through the same rule
    sft = {"prompt": CONV["prompt"], "completion": CONV["chosen"]}
    (one,), _ = tokenize_records(t, [render_sft_texts(t, sft)], max_length=200, max_prompt_length=100)
    assert one.chosen_ids == pair.chosen_ids and one.rejected_ids is None


def test_plain_strings_ending_in_eos_get_no_second_eos(tok):
    """' yes</s>' keeps its EOS; ' no</s>\\n' loses the newline after it; ' maybe' gets EOS appended."""
    prompt = "question: red answer:"
    eos = tok.eos_token_id
    prompt_ids, answers = tokenize_texts(tok, prompt, [" yes</s>", " no</s>\n", " maybe"])
    assert prompt_ids + answers[0] == tok(prompt + " yes</s>")["input_ids"]
    assert prompt_ids + answers[1] == tok(prompt + " no</s>")["input_ids"]
    assert prompt_ids + answers[2] == tok(prompt + " maybe")["input_ids"] + [eos]
    assert [a.count(eos) for a in answers] == [1, 1, 1]
    assert answer_text(" no</s>\n", "</s>") == " no</s>" and answer_text(" no\n", "</s>") == " no\n"


def test_tokenizer_that_appends_eos_itself(tok):
    """A post-processor that appends </s> to every encoding: its EOS is removed and ours added once, also when
    the text already ends in </s> (which used to give </s></s>)."""
    import copy

    from tokenizers.processors import TemplateProcessing

    t = copy.deepcopy(tok)
    t._tokenizer.post_processor = TemplateProcessing(single="$A </s>", special_tokens=[("</s>", t.eos_token_id)])
    assert t("red")["input_ids"][-1] == t.eos_token_id  # the tokenizer does append it
    prompt = "question: red answer:"
    prompt_ids, (yes, no) = tokenize_texts(t, prompt, [" yes", " no</s>"])
    plain = t(prompt + " yes", add_special_tokens=False)["input_ids"]
    assert prompt_ids + yes == plain + [t.eos_token_id]
    assert prompt_ids + no == t(prompt + " no</s>", add_special_tokens=False)["input_ids"]
    assert no.count(t.eos_token_id) == 1


def test_answers_identical_after_truncation_are_dropped(tok):
    """' yes good cat dog' vs ' yes good cat bird' differ only in their 4th token; with room for 3 answer tokens
    both become ' yes good cat': no signal left, so the pair is dropped and counted."""
    prompt, chosen, rejected = "question: red answer:", " yes good cat dog", " yes good cat bird"
    n_prompt = len(tok(prompt)["input_ids"])
    _, (c, r) = tokenize_texts(tok, prompt, [chosen, rejected])
    assert c[:3] == r[:3] and c[3] != r[3]
    texts = [(prompt, chosen, rejected), (prompt, " yes", " no")]
    pairs, stats = tokenize_records(tok, texts, max_length=n_prompt + 3, max_prompt_length=n_prompt)
    assert [p.index for p in pairs] == [1] and stats.dropped_identical == [0]
    assert "1 dropped (chosen and rejected identical after truncation: no signal)" in stats.summary()
