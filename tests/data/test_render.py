"""Rendering records to prompt / completion texts with a chat template (preftune.data.render)."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from preftune.data.render import is_conversational, render_sft_texts, render_texts
from preftune.errors import PreftuneError

# Every message renders as "<|role|> content " and an assistant turn ends with "</s> "; the generation prompt
# is "<|assistant|> ", exactly how an assistant turn begins, so the template is prefix-stable.
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} "
    "{% if m['role'] == 'assistant' %}{{ eos_token }} {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
# The generation prompt ends with a newline but an assistant turn with a space: not prefix-stable.
UNSTABLE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
STRICT = (
    "{% for m in messages %}{% if m['role'] == 'system' %}"
    "{{ raise_exception('system messages are not supported') }}"
    "{% endif %}{{ m['content'] }} {% endfor %}"
)

SENTENCES = ["what color is the sky", "the sky is blue", "the sky is green", "hello there"]


def tiny_tokenizer(template: str | None = TEMPLATE) -> PreTrainedTokenizerFast:
    """A word-level tokenizer trained on four sentences, with <s>, </s>, <pad> and the role tags as tokens."""
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    specials = ["<unk>", "<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
    tok.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=specials))
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    if template is not None:
        out.chat_template = template
    return out


def conv(prompt: str, chosen: str, rejected: str) -> dict:
    return {
        "prompt": [{"role": "user", "content": prompt}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


def test_standard_records_pass_through():
    record = {"prompt": "what color is the sky", "chosen": " blue", "rejected": " green"}
    assert not is_conversational(record)
    assert render_texts(None, record) == ("what color is the sky", " blue", " green")
    assert render_sft_texts(None, {"prompt": "p", "completion": "c"}) == ("p", "c")


def test_conversational_rendering_splits_at_the_generation_prompt():
    """prompt  = "<s>" + "<|user|> what color is the sky " + "<|assistant|> "
    full    = "<s><|user|> what color is the sky <|assistant|> the sky is blue </s> "
    chosen  = full minus the prompt = "the sky is blue </s> "
    (the template's end-of-turn is part of the answer)."""
    tok = tiny_tokenizer()
    prompt, chosen, rejected = render_texts(
        tok, conv("what color is the sky", "the sky is blue", "the sky is green")
    )
    assert prompt == "<s><|user|> what color is the sky <|assistant|> "
    assert chosen == "the sky is blue </s> "
    assert rejected == "the sky is green </s> "
    # BOS is in the rendered text, so the tokenizer must not add it again
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id


def test_multi_turn_prompt_and_sft():
    tok = tiny_tokenizer()
    record = {
        "prompt": [
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "hello there"},
            {"role": "user", "content": "sky"},
        ],
        "completion": [{"role": "assistant", "content": "blue"}],
    }
    prompt, completion = render_sft_texts(tok, record)
    assert prompt == "<s><|user|> hello <|assistant|> hello there </s> <|user|> sky <|assistant|> "
    assert completion == "blue </s> "


def test_string_prompt_with_message_completions_is_a_user_turn():
    tok = tiny_tokenizer()
    record = {
        "prompt": "sky",
        "chosen": [{"role": "assistant", "content": "blue"}],
        "rejected": [{"role": "assistant", "content": "green"}],
    }
    assert render_texts(tok, record) == ("<s><|user|> sky <|assistant|> ", "blue </s> ", "green </s> ")


def test_template_that_is_not_prefix_stable_is_refused():
    tok = tiny_tokenizer(UNSTABLE)
    with pytest.raises(PreftuneError) as e:
        render_texts(tok, conv("what color is the sky today", "blue", "green"))
    msg = str(e.value)
    assert "chat template is not prefix-stable" in msg
    assert "row beginning 'what color is the sky today'" in msg
    # "<|user|>" (8) + " " + "what color is the sky today" (27) + " " = 37, + "<|assistant|>" (13) = 50:
    # character 50 is "\n" in the prompt and " " in the full conversation
    assert "differ at character 50: '\\n' vs ' blue '" in msg


def test_tokenizer_without_chat_template():
    with pytest.raises(
        PreftuneError, match="has no chat template.*set tokenizer.chat_template or use standard string data"
    ):
        render_texts(tiny_tokenizer(None), conv("a", "b", "c"))


def test_template_exception_names_the_row():
    tok = tiny_tokenizer(STRICT)
    record = conv("hello", "a", "b")
    record["prompt"].insert(0, {"role": "system", "content": "be nice"})
    with pytest.raises(
        PreftuneError, match="chat template failed on the row beginning 'be nice hello': system messages"
    ):
        render_texts(tok, record)
