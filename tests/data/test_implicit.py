"""Implicit prompts (preftune.data.implicit): role-aware for turn-marked text and message lists, a plain
shared prefix otherwise."""

from __future__ import annotations

import pytest

from preftune.data.implicit import shared_word_prefix, split_message_prompt, split_text_prompt
from preftune.data.load import load_records

from .files import write_jsonl


def test_implicit_prompt_backs_off_to_a_word_boundary():
    """ "The answer is blue" vs "The answer is black": the common prefix "The answer is bl" cuts a word;
    backing off to the space gives "The answer is " and the space moves to the completions."""
    c, r = "Q: sky?\nA: The answer is blue", "Q: sky?\nA: The answer is black"
    k = shared_word_prefix(c, r)
    assert (c[:k], c[k:], r[k:]) == ("Q: sky?\nA: The answer is", " blue", " black")
    # a newline before the split stays with the prompt
    c, r = "Human: hi\nBot:\nHello", "Human: hi\nBot:\nGo"
    k = shared_word_prefix(c, r)
    assert (c[:k], c[k:]) == ("Human: hi\nBot:\n", "Hello")


def test_implicit_format_jsonl(tmp_path):
    rows = [
        {
            "chosen": "\n\nHuman: color of the sky?\n\nAssistant: Blue",
            "rejected": "\n\nHuman: color of the sky?\n\nAssistant: Bleu",
        },
        {"chosen": "Hi there", "rejected": "Bye now"},  # no shared word: no prompt
    ]
    data = load_records(write_jsonl(tmp_path / "d.jsonl", rows), skip_invalid=True)
    assert data.format == "implicit"
    assert data.records == [
        {"prompt": "\n\nHuman: color of the sky?\n\nAssistant:", "chosen": " Blue", "rejected": " Bleu"}
    ]
    assert [str(x) for x in data.invalid] == [
        f"{tmp_path / 'd.jsonl'} line 2: chosen and rejected share no leading text, so there is no prompt"
    ]


def test_implicit_conversational(tmp_path):
    u1 = {"role": "user", "content": "hi"}
    a1 = {"role": "assistant", "content": "hello"}
    u2 = {"role": "user", "content": "sky?"}
    rows = [
        {
            "chosen": [u1, a1, u2, {"role": "assistant", "content": "blue"}],
            "rejected": [u1, a1, u2, {"role": "assistant", "content": "green"}],
        }
    ]
    data = load_records(write_jsonl(tmp_path / "d.jsonl", rows))
    assert data.format == "implicit" and data.conversational
    assert data.records == [
        {
            "prompt": [u1, a1, u2],
            "chosen": [{"role": "assistant", "content": "blue"}],
            "rejected": [{"role": "assistant", "content": "green"}],
        }
    ]


# Hand-written HH-RLHF rows whose replies share leading words: the plain shared prefix would end inside the
# reply ("...Assistant: You're welcome"), the role-aware split ends right after the last "\n\nAssistant:".
HH = [
    ("\n\nHuman: Thanks for the help!\n\nAssistant: You're welcome.",
     "\n\nHuman: Thanks for the help!\n\nAssistant: You're welcome!"),
    ("\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: And 3+3?\n\nAssistant: The answer is 6.",
     "\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: And 3+3?\n\nAssistant: The answer is 7."),
    ("\n\nHuman: How do I bake bread?\n\nAssistant: Sure.\n\nFirst, mix flour and water.",
     "\n\nHuman: How do I bake bread?\n\nAssistant: Sure.\n\nFirst, buy a loaf."),
    ("\n\nHuman: Who are you?\n\nAssistant: I am an Assistant: a program that helps.",
     "\n\nHuman: Who are you?\n\nAssistant: I am an Assistant: a person."),
]


def test_hh_prompts_end_at_the_last_assistant_turn():
    """Row by row (prompt = chosen[:k]):
    1. prompt "...Thanks for the help!\n\nAssistant:", answers " You're welcome." / " You're welcome!"
       (the plain prefix would have been "...Assistant: You're", cutting the shared words off the answers);
    2. two turns: the prompt runs through the second "\n\nAssistant:", answers " The answer is 6." / "... 7.";
    3. a reply holding a blank line ("Sure.\n\nFirst, ...") is not a turn marker: answers start at " Sure.";
    4. "Assistant:" inside the reply without the blank line before it is not a marker either."""
    expected = [
        ("\n\nHuman: Thanks for the help!\n\nAssistant:", " You're welcome.", " You're welcome!"),
        ("\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: And 3+3?\n\nAssistant:", " The answer is 6.",
         " The answer is 7."),
        ("\n\nHuman: How do I bake bread?\n\nAssistant:", " Sure.\n\nFirst, mix flour and water.",
         " Sure.\n\nFirst, buy a loaf."),
        ("\n\nHuman: Who are you?\n\nAssistant:", " I am an Assistant: a program that helps.",
         " I am an Assistant: a person."),
    ]
    for (c, r), want in zip(HH, expected):
        k, how = split_text_prompt(c, r)
        assert (c[:k], c[k:], r[k:], how) == (*want, "turn")
    # what the plain shared prefix would have given for row 1: the defect this split fixes
    k = shared_word_prefix(*HH[0])
    assert HH[0][0][:k].endswith("Assistant: You're")


def test_hh_rows_that_differ_before_the_last_turn_are_refused():
    differ_in_human = ("\n\nHuman: hi\n\nAssistant: hello\n\nHuman: red?\n\nAssistant: yes",
                       "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: blue?\n\nAssistant: no")
    assert split_text_prompt(*differ_in_human) == (
        "chosen and rejected differ before the last assistant turn: chosen still holds a '\\n\\nHuman:' turn "
        "after the shared prompt")
    first_turn = ("\n\nHuman: hi\n\nAssistant: hello", "\n\nHuman: bye\n\nAssistant: hello")
    assert split_text_prompt(*first_turn) == (
        "chosen and rejected differ before the first '\\n\\nAssistant:' turn, so there is no shared prompt")


@pytest.mark.parametrize("chosen, rejected, prompt", [
    ("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nHello there.<|im_end|>\n",
     "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nHello friend.<|im_end|>\n",
     "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"),
    ("<s>[INST] hi [/INST] Hello there. </s>", "<s>[INST] hi [/INST] Hello friend. </s>", "<s>[INST] hi [/INST]"),
    ("### Instruction:\nhi\n\n### Response:\nHello there.", "### Instruction:\nhi\n\n### Response:\nHello friend.",
     "### Instruction:\nhi\n\n### Response:\n"),
], ids=["chatml", "llama-2", "alpaca"])
def test_rendered_chat_text_splits_at_the_assistant_marker(chosen, rejected, prompt):
    k, how = split_text_prompt(chosen, rejected)
    assert (chosen[:k], how) == (prompt, "turn")


def test_hh_file_counts_the_rows_that_fell_back_to_a_plain_prefix(tmp_path):
    """4 HH rows split at the turn, 1 row without markers falls back to the plain prefix ("Q: sky? A:"),
    1 row differs in an earlier human turn and is dropped with its reason."""
    rows = [{"chosen": c, "rejected": r} for c, r in HH]
    rows.append({"chosen": "Q: sky? A: blue", "rejected": "Q: sky? A: red"})
    rows.append({"chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d",
                 "rejected": "\n\nHuman: a\n\nAssistant: b\n\nHuman: x\n\nAssistant: y"})
    data = load_records(write_jsonl(tmp_path / "hh.jsonl", rows), skip_invalid=True)
    assert data.format == "implicit" and len(data.records) == 5
    assert data.records[0] == {"prompt": "\n\nHuman: Thanks for the help!\n\nAssistant:",
                               "chosen": " You're welcome.", "rejected": " You're welcome!"}
    assert data.records[4] == {"prompt": "Q: sky? A:", "chosen": " blue", "rejected": " red"}
    assert data.notes == {"prompt_at_turn": 4, "prompt_at_prefix": 1}
    assert data.summary().endswith(
        "; dropped 1 invalid row: 1 chosen and rejected differ before the last assistant turn: chosen still holds "
        "a '\\n\\nHuman:' turn after the shared prompt; implicit prompts end after the last assistant turn in 4 rows "
        "and fell back to the plain shared prefix (no turn markers) in 1")


def test_message_lists_split_at_the_first_differing_assistant_message():
    """The replies share their first words ("You're"): the prompt is still the three shared messages."""
    u1, a1, u2 = ({"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                  {"role": "user", "content": "thanks"})
    c = [u1, a1, u2, {"role": "assistant", "content": "You're welcome."}]
    r = [u1, a1, u2, {"role": "assistant", "content": "You're welcome!"}]
    assert split_message_prompt(c, r) == 3
    c2 = [u1, a1, {"role": "user", "content": "red?"}, {"role": "assistant", "content": "yes"}]
    r2 = [u1, a1, {"role": "user", "content": "blue?"}, {"role": "assistant", "content": "no"}]
    assert split_message_prompt(c2, r2) == (
        "chosen and rejected differ in message 3, a user message; only the assistant's reply may differ")
