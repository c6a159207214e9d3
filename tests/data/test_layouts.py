"""Row layouts other projects publish (preftune.data.layouts), each on a small hand-made file in that layout,
the prompt template, and the one-sentence answer for layouts preftune does not read."""

from __future__ import annotations

import pytest

from preftune.config import TrainConfig
from preftune.data.layouts import PromptTemplate
from preftune.data.load import load_records
from preftune.data.render import render_texts
from preftune.errors import PreftuneError

from .files import write_jsonl
from .test_render import tiny_tokenizer


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def test_sharegpt_llama_factory_dpo(tmp_path):
    """LLaMA-Factory's DPO format: conversations of {from, value} (human/gpt/system), chosen and rejected as
    one message object each; a `system` column becomes the first message."""
    rows = [
        {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "hi"},
                           {"from": "gpt", "value": "hello"}, {"from": "human", "value": "sky?"}],
         "chosen": {"from": "gpt", "value": "blue"}, "rejected": {"from": "gpt", "value": "green"}},
        {"conversations": [{"from": "human", "value": "2+2?"}], "system": "You add.",
         "chosen": {"from": "gpt", "value": "4"}, "rejected": {"from": "gpt", "value": "5"}},
        {"conversations": [{"from": "function_call", "value": "{}"}],
         "chosen": {"from": "gpt", "value": "4"}, "rejected": {"from": "gpt", "value": "5"}},
    ]
    data = load_records(write_jsonl(tmp_path / "sharegpt.jsonl", rows), skip_invalid=True)
    assert (data.format, data.layout, data.conversational) == ("conversational", "sharegpt", True)
    assert data.records == [
        {"prompt": [{"role": "system", "content": "Be brief."}, user("hi"), assistant("hello"), user("sky?")],
         "chosen": [assistant("blue")], "rejected": [assistant("green")]},
        {"prompt": [{"role": "system", "content": "You add."}, user("2+2?")],
         "chosen": [assistant("4")], "rejected": [assistant("5")]},
    ]
    assert [x.reason for x in data.invalid] == [
        "field 'conversations' message 1 holds a tool call without a name; write {\"name\": ..., \"arguments\": {...}}"]
    assert "(conversational, ShareGPT layout)" in data.summary()
    # SFT on ShareGPT chat data: the last turn is the answer
    sft = [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}]
    assert load_records(write_jsonl(tmp_path / "sft.jsonl", sft), kind="sft").records == [
        {"prompt": [user("hi")], "completion": [assistant("hello")]}]


def test_content_as_a_list_of_parts(tmp_path):
    """OpenAI-style content parts: text parts are joined with a newline (as vLLM does for text-only models);
    an image part makes the row invalid with its reason."""
    def parts(*texts):
        return [{"type": "text", "text": t} for t in texts]

    rows = [
        {"prompt": [{"role": "user", "content": parts("What is", "2+2?")}],
         "chosen": [{"role": "assistant", "content": parts("4")}],
         "rejected": [{"role": "assistant", "content": parts("5")}]},
        {"prompt": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]}],
         "chosen": [assistant("cat")], "rejected": [assistant("dog")]},
    ]
    data = load_records(write_jsonl(tmp_path / "parts.jsonl", rows), skip_invalid=True)
    assert data.records == [{"prompt": [user("What is\n2+2?")], "chosen": [assistant("4")],
                             "rejected": [assistant("5")]}]
    assert data.invalid[0].reason == ("field 'prompt' message 1 has a 'image_url' part; only text parts "
                                      "are read ({\"type\": \"text\", \"text\" or \"value\": ...})")


def test_openai_preference_fine_tuning(tmp_path):
    rows = [{"input": {"messages": [user("Hello")], "tools": [], "parallel_tool_calls": True},
             "preferred_output": [assistant("Hi there!")], "non_preferred_output": [assistant("Go away.")]}]
    data = load_records(write_jsonl(tmp_path / "openai.jsonl", rows))
    assert (data.format, data.layout) == ("conversational", "openai")
    assert data.records == [{"prompt": [user("Hello")], "chosen": [assistant("Hi there!")],
                             "rejected": [assistant("Go away.")]}]
    assert load_records(tmp_path / "openai.jsonl", kind="sft").records == [
        {"prompt": [user("Hello")], "completion": [assistant("Hi there!")]}]


def test_orca_system_and_question_with_a_prompt_template(tmp_path):
    """'{system}\\n\\n{question}' (typed with backslashes, as on a command line): an empty system drops itself
    and the blank line after it. Without the template the file is refused with the flag that reads it."""
    rows = [{"system": "You are an AI assistant.", "question": "2+2?", "chosen": "4", "rejected": "5"},
            {"system": "", "question": "3+3?", "chosen": "6", "rejected": "7"}]
    path = write_jsonl(tmp_path / "orca.jsonl", rows)
    data = load_records(path, prompt_template="{system}\\n\\n{question}")
    assert data.format == "standard"
    assert [r["prompt"] for r in data.records] == ["You are an AI assistant.\n\n2+2?", "3+3?"]
    with pytest.raises(PreftuneError) as e:
        load_records(path)
    assert str(e.value) == (f"{path} looks like Orca-style pairs (system, question, chosen, rejected) with no "
                            "prompt field; build the prompt with --prompt-template \"{system}\\n\\n{question}\"")


def test_alpaca_instruction_and_input_with_the_alpaca_template(tmp_path):
    """Alpaca's own prompt as a template; an empty input drops "\\n\\n### Input:\\n" (the text before it),
    giving Alpaca's no-input prompt. output = [better, worse]."""
    template = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
    rows = [{"instruction": "Add the numbers.", "input": "2 and 2", "output": ["4", "5"]},
            {"instruction": "Say hi.", "input": "", "output": ["Hi!", "No."]}]
    data = load_records(write_jsonl(tmp_path / "alpaca.jsonl", rows), prompt_template=template)
    assert (data.format, data.layout) == ("standard", "alpaca")
    assert data.records == [
        {"prompt": "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 2\n\n### Response:\n",
         "chosen": "4", "rejected": "5"},
        {"prompt": "### Instruction:\nSay hi.\n\n### Response:\n", "chosen": "Hi!", "rejected": "No."},
    ]
    # without a template the user turn is instruction + "\n" + input, as LLaMA-Factory builds it
    plain = load_records(tmp_path / "alpaca.jsonl")
    assert [r["prompt"] for r in plain.records] == ["Add the numbers.\n2 and 2", "Say hi."]


def test_alpaca_pairwise_history_becomes_earlier_turns(tmp_path):
    """history [[q, a], ...] is kept as user/assistant turns before the current instruction, not dropped; a file
    with history gives message lists (for the chat template), also for its rows without history. Three ranked
    outputs give the best against the second (LLaMA-Factory's rule, the default --ranked best-vs-next)."""
    rows = [{"instruction": "And 3+3?", "input": "", "output": ["6", "7"], "history": [["2+2?", "4"]]},
            {"instruction": "Name a colour.", "input": "", "output": ["Red", "Car"], "history": []},
            {"instruction": "x", "output": ["a", "b", "c"]}]
    data = load_records(write_jsonl(tmp_path / "ranking.jsonl", rows), skip_invalid=True)
    assert (data.format, data.layout) == ("conversational", "alpaca")
    assert data.records == [
        {"prompt": [user("2+2?"), assistant("4"), user("And 3+3?")], "chosen": [assistant("6")],
         "rejected": [assistant("7")]},
        {"prompt": [user("Name a colour.")], "chosen": [assistant("Red")], "rejected": [assistant("Car")]},
        {"prompt": [user("x")], "chosen": [assistant("a")], "rejected": [assistant("b")]},
    ]
    assert not data.invalid and data.notes["ranked_rows"] == 1


def test_ultrafeedback_binarized_repeated_user_turn_is_used_once(tmp_path):
    """prompt is a string and chosen/rejected repeat it as their first (user) message: the repeat is dropped
    once, so the template renders one user turn (before, the rendering failed and blamed the template)."""
    row = {"prompt": "2+2?", "prompt_id": "abc",
           "chosen": [user("2+2?"), assistant("4")], "rejected": [user("2+2?"), assistant("5")],
           "messages": [user("2+2?"), assistant("4")], "score_chosen": 9.0, "score_rejected": 2.0}
    bad = {**row, "rejected": [user("3+3?"), assistant("6")]}
    data = load_records(write_jsonl(tmp_path / "uf.jsonl", [row, bad]), skip_invalid=True)
    assert data.records == [{"prompt": [user("2+2?")], "chosen": [assistant("4")], "rejected": [assistant("5")]}]
    assert data.notes == {"repeated_prompt": 1}
    assert "chosen/rejected repeated the prompt's messages in 1 rows (used once)" in data.summary()
    assert data.invalid[0].reason == ("chosen repeats the prompt's messages but the other answer does not; give "
                                      "both the reply only, or both the whole conversation")
    # "<s>" + "<|user|> 2+2? " + "<|assistant|> " ; the answer "4 </s> " (this template's end of turn)
    assert render_texts(tiny_tokenizer(), data.records[0]) == ("<s><|user|> 2+2? <|assistant|> ", "4 </s> ",
                                                               "5 </s> ")


@pytest.mark.parametrize("row, kind, sentence", [
    ({"question": "q", "chosen": "a", "rejected": "b"}, "preference",
     "looks like pairs whose prompt is in 'question'; pass --prompt-field question"),
    ({"question": "q", "response_j": "a", "response_k": "b"}, "preference",
     "looks like StackExchange-paired data (question, response_j, response_k); pass --prompt-field question "
     "--chosen-field response_j --rejected-field response_k"),
    ({"prompt": "p", "completion": "c", "label": True}, "preference",
     "looks like unpaired KTO-style data (prompt, completion, label); train it with --loss kto (or "
     "apo_zero_unpaired), which reads the labels; the other losses need a chosen and a rejected answer per prompt"),
    ({"prompt": "p", "completion": "c"}, "preference",
     "looks like SFT data (prompt, completion); train it with `preftune sft`, or give each prompt a chosen and a "
     "rejected answer"),
    ({"messages": [user("hi"), assistant("hello")]}, "preference",
     "looks like chat SFT data (messages without chosen/rejected); train it with `preftune sft`, or add chosen "
     "and rejected replies"),
    ({"conversations": [{"from": "human", "value": "hi"}]}, "preference",
     "looks like ShareGPT SFT data (conversations without chosen/rejected); train it with `preftune sft`, or add "
     "chosen and rejected message objects as LLaMA-Factory's DPO format does"),
    ({"instruction": "i", "input": "", "output": "o"}, "preference",
     "looks like Alpaca SFT data (instruction, input and one output); train it with `preftune sft`, or give "
     "output as [chosen, rejected]"),
    ({"instruction": "i", "completions": [{"response": "a", "overall_score": 7}]}, "preference",
     "looks like rated completions (UltraFeedback-style 'completions' with ratings); binarize them into "
     "chosen/rejected first, as HuggingFaceH4/ultrafeedback_binarized does"),
    ({"prompt": "p", "response_0": "a", "response_1": "b", "better_response_id": 0}, "preference",
     "looks like PKU-SafeRLHF-style data (response_0, response_1 and which is better); which response wins depends "
     "on the label you train for, so write chosen = response_<better_response_id> (helpfulness) or "
     "response_<safer_response_id> (harmlessness) and rejected = the other one first; naming the columns with "
     "--chosen-field/--rejected-field would train every row whose better answer is response_1 backwards"),
    ({"text": "just text"}, "sft",
     "looks like plain text (a 'text' field); preference training needs prompt/chosen/rejected fields, SFT needs "
     "prompt/completion"),
], ids=["question", "stack-exchange", "kto", "sft-data", "chat-sft", "sharegpt-sft", "alpaca-sft", "rated", "pku",
        "text"])
def test_unsupported_layout_is_one_sentence_naming_what_reads_it(tmp_path, row, kind, sentence):
    path = write_jsonl(tmp_path / "d.jsonl", [row] * 3)
    with pytest.raises(PreftuneError) as e:
        load_records(path, kind=kind)
    assert str(e.value) == f"{path} {sentence}"


def test_named_fields_switch_layout_detection_off(tmp_path):
    """--prompt-field question reads the 'question' rows of the hint above; field paths walk lists (a.0)."""
    rows = [{"question": "q", "answers": ["a", "b"]}]
    data = load_records(write_jsonl(tmp_path / "d.jsonl", rows), prompt_field="question",
                        chosen_field="answers.0", rejected_field="answers.1")
    assert data.records == [{"prompt": "q", "chosen": "a", "rejected": "b"}]


def test_prompt_template_syntax():
    t = PromptTemplate.parse("{{literal}} {meta.q}: {a}")
    assert t.names == ("meta.q", "a")
    assert t.fill({"meta": {"q": "Q"}, "a": "A"}) == "{literal} Q: A"
    assert t.fill({"meta": {"q": "Q"}}).reason == "missing field 'a' (used by the prompt template)"
    assert t.fill({"meta": {"q": ""}, "a": None}).reason == (
        "the prompt template gives an empty prompt (fields meta.q, a are empty)")
    for bad in ("{a", "no fields", "{}", "a}"):
        with pytest.raises(PreftuneError, match="prompt_template"):
            PromptTemplate.parse(bad)


def test_prompt_template_config_field_and_flag():
    """A TrainConfig field validated like the others; the flag takes the text as typed (YAML would turn
    '{question}' into a mapping)."""
    from preftune.cli import build_parser, config_from_args

    with pytest.raises(PreftuneError, match="unclosed or empty"):
        TrainConfig(prompt_template="{system")
    args = build_parser().parse_args(["train", "--prompt-template", "{question}"])
    assert config_from_args(args).prompt_template == "{question}"


def test_chat_messages_for_sft(tmp_path):
    """{"messages": [...]} (OpenAI / TRL chat SFT): the last message is the answer; one message has no prompt."""
    rows = [{"messages": [user("hi"), assistant("hello")]}, {"messages": [user("alone")]}]
    data = load_records(write_jsonl(tmp_path / "chat.jsonl", rows), kind="sft", skip_invalid=True)
    assert (data.layout, data.records) == ("messages", [{"prompt": [user("hi")], "completion": [assistant("hello")]}])
    assert data.invalid[0].reason == "field 'messages' holds fewer than 2 messages: no prompt before the answer"


def test_sharegpt_with_role_content_tags_in_messages(tmp_path):
    """LLaMA-Factory's sharegpt format configured with role/content tags: {"messages": [...], "chosen": {...}}."""
    rows = [{"messages": [user("sky?")], "chosen": assistant("blue"), "rejected": assistant("green")}]
    data = load_records(write_jsonl(tmp_path / "m.jsonl", rows))
    assert (data.layout, data.records) == ("sharegpt", [{"prompt": [user("sky?")], "chosen": [assistant("blue")],
                                                         "rejected": [assistant("green")]}])
