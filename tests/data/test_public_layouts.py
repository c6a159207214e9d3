"""Public preference layouts read right (issue 25), each on a small file written from the public schema: LLaMA-Factory
v1 and its ranking files, argilla, NeMo, HelpSteer2-preference, SHP, Nectar, tool-calling conversations; the ranked
rule; and the refusals that name the exact flags or conversion instead of a hint that swaps labels."""

from __future__ import annotations

import json

import pytest

from preftune.data.load import load_records
from preftune.data.render import render_texts
from preftune.errors import PreftuneError

from .files import write_jsonl
from .test_render import tiny_tokenizer


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def v1(role: str, text: str, weight: float) -> dict:
    return {"role": role, "content": [{"type": "text", "value": text}], "loss_weight": weight}


def test_llamafactory_v1_whole_conversations_with_value_parts(tmp_path):
    """LLaMA-Factory v1's DPOSample: chosen_messages/rejected_messages repeat the prompt turns; parts use "value";
    the shared leading messages are the prompt; a 'reasoning' part is named in the row's reason."""
    rows = [{"chosen_messages": [v1("system", "Be brief.", 0.0), v1("user", "2+2?", 0.0), v1("assistant", "4", 1.0)],
             "rejected_messages": [v1("system", "Be brief.", 0.0), v1("user", "2+2?", 0.0),
                                   v1("assistant", "5", 1.0)]},
            {"chosen_messages": [v1("user", "hi", 0.0), {"role": "assistant", "loss_weight": 1.0,
                                                          "content": [{"type": "reasoning", "value": "hmm"}]}],
             "rejected_messages": [v1("user", "hi", 0.0), v1("assistant", "yo", 1.0)]}]
    data = load_records(write_jsonl(tmp_path / "v1.jsonl", rows), skip_invalid=True)
    assert (data.layout, data.format) == ("llamafactory-v1", "implicit")
    assert data.records == [{"prompt": [{"role": "system", "content": "Be brief."}, user("2+2?")],
                             "chosen": [assistant("4")], "rejected": [assistant("5")]}]
    assert data.invalid[0].reason == ("field 'chosen_messages' message 2 has a 'reasoning' part; only text parts "
                                      "are read ({\"type\": \"text\", \"text\" or \"value\": ...})")
    assert "LLaMA-Factory v1 layout" in data.summary()


@pytest.mark.parametrize("ranked, pairs", [
    ("best-vs-next", [("a1", "a2"), ("b1", "b2")]),
    ("best-vs-worst", [("a1", "a4"), ("b1", "b2")]),
    ("all-pairs", [("a1", "a2"), ("a1", "a3"), ("a1", "a4"), ("a2", "a3"), ("a2", "a4"), ("a3", "a4"), ("b1", "b2")]),
])
def test_alpaca_ranked_outputs_by_rule(tmp_path, ranked, pairs):
    """oaast_rm-shaped rows: output lists answers best first; a row of 4 makes 1, 1 or 4*3/2 = 6 pairs, a row of 2
    one; the summary counts the ranked rows and their pairs. History stays earlier turns whatever the rule."""
    rows = [{"instruction": "A?", "input": "", "output": ["a1", "a2", "a3", "a4"], "history": [["hi", "hello"]]},
            {"instruction": "B?", "input": "", "output": ["b1", "b2"], "history": []}]
    data = load_records(write_jsonl(tmp_path / "rm.jsonl", rows), ranked=ranked)
    got = [(r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in data.records]
    assert got == pairs
    assert data.records[0]["prompt"] == [user("hi"), assistant("hello"), user("A?")]
    n = len(pairs) - 1
    assert f"1 row ranked more than two answers: {ranked} made {n} pair{'s' if n > 1 else ''} of them" in data.summary()
    assert data.origins[0].endswith("line 1" + (" pair 1" if n > 1 else ""))


def test_alpaca_named_answer_fields_keep_history_and_the_chat_template(tmp_path):
    """--chosen-field output.0 --rejected-field output.1 (and --prompt-field instruction) read the same pairs as the
    default: the prompt, history and system turn stay (before: implicit-prompt junk, or history silently dropped)."""
    rows = [{"instruction": "And 3+3?", "input": "", "output": ["6", "7", "8"], "history": [["2+2?", "4"]],
             "system": "You add."}]
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    want = [{"prompt": [{"role": "system", "content": "You add."}, user("2+2?"), assistant("4"), user("And 3+3?")],
             "chosen": [assistant("6")], "rejected": [assistant("7")]}]
    assert load_records(path).records == want
    assert load_records(path, chosen_field="output.0", rejected_field="output.1").records == want
    assert load_records(path, prompt_field="instruction").records == want
    third = load_records(path, prompt_field="instruction", chosen_field="output.0", rejected_field="output.2")
    assert third.records[0]["rejected"] == [assistant("8")]


def test_argilla_and_nemo_chosen_response(tmp_path):
    """argilla's instruction/chosen_response/rejected_response is a user turn and two replies (not "Alpaca SFT
    data"); NeMo-Aligner's prompt is rendered text, so its rows stay strings."""
    rows = [{"source": "evol", "instruction": "2+2?", "chosen_response": "4", "chosen_avg_rating": 5.0,
             "rejected_response": "5", "rejected_avg_rating": 1.0}]
    data = load_records(write_jsonl(tmp_path / "argilla.jsonl", rows))
    assert (data.layout, data.format) == ("argilla", "conversational")
    assert data.records == [{"prompt": [user("2+2?")], "chosen": [assistant("4")], "rejected": [assistant("5")]}]
    nemo = [{"prompt": "<extra_id_1>User\n2+2?\n<extra_id_1>Assistant\n", "chosen_response": "4\n<extra_id_1>",
             "rejected_response": "5\n<extra_id_1>"}]
    data = load_records(write_jsonl(tmp_path / "nemo.jsonl", nemo))
    assert (data.layout, data.format) == ("nemo", "standard")
    assert data.records[0]["chosen"] == "4\n<extra_id_1>"


def test_helpsteer2_preference_sign_decides_and_ties_are_dropped(tmp_path):
    """preference_strength -2: response_1 is better; +1: response_2; 0: a tie, dropped and counted. A multi-turn
    prompt ("<extra_id_1>Assistant\\n", "<extra_id_1>User\\n") becomes messages."""
    rows = [{"split": "train", "prompt": "2+2?", "response_1": "4", "response_2": "5", "preference_strength": -2},
            {"split": "train", "prompt": "hi<extra_id_1>Assistant\nhello<extra_id_1>User\n3+3?",
             "response_1": "7", "response_2": "6", "preference_strength": 1},
            {"split": "train", "prompt": "x?", "response_1": "a", "response_2": "b", "preference_strength": 0}]
    data = load_records(write_jsonl(tmp_path / "preference.jsonl", rows))
    assert data.layout == "helpsteer2"
    assert data.records == [
        {"prompt": [user("2+2?")], "chosen": [assistant("4")], "rejected": [assistant("5")]},
        {"prompt": [user("hi"), assistant("hello"), user("3+3?")], "chosen": [assistant("6")],
         "rejected": [assistant("7")]}]
    assert [(x.row, x.reason) for x in data.skipped] == [(3, "tie")]
    assert "dropped 1 pair with nothing to train on: 1 tie" in data.summary()


def test_shp_labels_decide(tmp_path):
    rows = [{"post_id": "p", "domain": "askscience", "history": "Why is the sky blue?", "human_ref_A": "Rayleigh",
             "human_ref_B": "Magic", "labels": 1, "score_A": 9, "score_B": 1},
            {"post_id": "q", "domain": "askscience", "history": "Why?", "human_ref_A": "No", "human_ref_B": "Because",
             "labels": 0, "score_A": 1, "score_B": 7}]
    data = load_records(write_jsonl(tmp_path / "shp.jsonl", rows))
    assert [(r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in data.records] == [
        ("Rayleigh", "Magic"), ("Because", "No")]


def test_nectar_orders_by_rank_not_list_position(tmp_path):
    """Nectar lists answers in any order with a rank (1 = best): rank 1 is "good" although listed third; each answer
    follows the prompt's "Assistant:" after a space (HH-RLHF's convention). Equal ranks are a tie."""
    prompt = "\n\nHuman: 2+2?\n\nAssistant:"
    answers = [{"answer": "bad", "model": "m3", "rank": 3.0}, {"answer": "ok", "model": "m2", "rank": 2.0},
               {"answer": "good", "model": "m1", "rank": 1.0}]
    rows = [{"prompt": prompt, "answers": answers, "turns": 1, "num_responses": 3, "good_natured": True},
            {"prompt": prompt, "answers": [{"answer": "x", "rank": 1}, {"answer": "y", "rank": 1}], "turns": 1}]
    data = load_records(write_jsonl(tmp_path / "nectar.jsonl", rows))
    assert data.layout == "nectar"
    assert data.records == [{"prompt": prompt, "chosen": " good", "rejected": " ok"}]
    assert [x.reason for x in data.skipped] == ["tie"]
    worst = load_records(tmp_path / "nectar.jsonl", ranked="best-vs-worst").records
    assert (worst[0]["chosen"], worst[0]["rejected"]) == (" good", " bad")


TOOLS = [{"type": "function", "function": {"name": "weather", "description": "Weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
TOOL_TEMPLATE = (
    "{% if tools %}<tools>{% for t in tools %}{{ t.function.name }} {% endfor %}</tools> {% endif %}"
    "{% for m in messages %}<|{{ m.role }}|> {{ m.content }} {% for c in m.tool_calls or [] %}"
    "<call> {{ c.function.name }} {{ c.function.arguments | tojson }} {% endfor %}"
    "{% if m.role == 'assistant' %}</s> {% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}")


def test_tool_calls_and_the_tools_column_reach_the_chat_template(tmp_path):
    """A `tools` column (given as JSON text, as LLaMA-Factory writes it) and assistant tool_calls are kept and
    rendered as TRL renders them: apply_chat_template(messages, tools=tools). ShareGPT's function_call /
    observation turns become an assistant tool call and a tool result."""
    call = {"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}
    rows = [{"prompt": [user("Weather in Paris?")], "tools": json.dumps(TOOLS),
             "chosen": [{"role": "assistant", "content": None, "tool_calls": [call]}],
             "rejected": [assistant("It is sunny.")]}]
    data = load_records(write_jsonl(tmp_path / "tools.jsonl", rows))
    record = data.records[0]
    assert record["tools"] == TOOLS and record["chosen"] == [{"role": "assistant", "content": "", "tool_calls": [call]}]
    tok = tiny_tokenizer(TOOL_TEMPLATE)
    prompt, chosen, _ = render_texts(tok, record)
    assert prompt == tok.apply_chat_template(record["prompt"], tools=TOOLS, tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<tools>weather </tools> ")
    assert chosen == ' <call> weather {"city": "Paris"} </s> '
    sharegpt = [{"conversations": [{"from": "human", "value": "Weather in Paris?"},
                                   {"from": "function_call", "value": '{"name": "weather", "arguments": {"city": "Paris"}}'},
                                   {"from": "observation", "value": "sunny"}],
                 "chosen": {"from": "gpt", "value": "Sunny."}, "rejected": {"from": "gpt", "value": "Rain."},
                 "tools": json.dumps(TOOLS)}]
    rec = load_records(write_jsonl(tmp_path / "sg.jsonl", sharegpt)).records[0]
    assert rec["prompt"][1:] == [{"role": "assistant", "content": "", "tool_calls": [call]},
                                 {"role": "tool", "content": "sunny"}]
    assert rec["tools"] == TOOLS


@pytest.mark.parametrize("row, flags, sentence", [
    ({"prompt": "p", "response_1": "a", "response_2": "b", "preference_strength": 2},
     {"chosen_field": "response_1", "rejected_field": "response_2"},
     "looks like HelpSteer2 preference data (response_1, response_2, preference_strength); which response is better "
     "is the sign of preference_strength (negative: response_1), not a column: leave out --chosen-field/"
     "--rejected-field and preftune reads the label"),
    ({"prompt": "p", "answers": [{"answer": "a", "rank": 2}, {"answer": "b", "rank": 1}]},
     {"chosen_field": "answers.0.answer", "rejected_field": "answers.1.answer"},
     "looks like Nectar-style ranked answers ('answers' with ranks); the best answer is the one ranked 1, not the "
     "first in the list; pick the pairs with --ranked: leave out --chosen-field/--rejected-field and preftune reads "
     "the label"),
    ({"prompt": "p", "response_0": "a", "response_1": "b", "better_response_id": 1, "safer_response_id": 0},
     {"chosen_field": "response_0", "rejected_field": "response_1"},
     "looks like PKU-SafeRLHF-style data (response_0, response_1 and which is better); which response wins depends "
     "on the label you train for, so write chosen = response_<better_response_id> (helpfulness) or "
     "response_<safer_response_id> (harmlessness) and rejected = the other one first; naming the columns with "
     "--chosen-field/--rejected-field would train every row whose better answer is response_1 backwards"),
    ({"system": "s", "input": "q", "chosen": "a", "rejected": "b"}, {},
     "looks like pairs whose prompt is in 'input'; pass --prompt-field input (or --prompt-template "
     "\"{system}\\n\\n{input}\" to keep a system field)"),
    ({"prompt": "p", "response": "a", "helpfulness": 3, "correctness": 3}, {},
     "looks like single rated responses (HelpSteer-style 'response' with helpfulness scores); pair two responses to "
     "each prompt first (nvidia/HelpSteer2's preference file is read as it is), or train the good responses with "
     "`preftune sft --completion-field response`"),
], ids=["helpsteer2-named", "nectar-named", "pku-named", "input", "helpsteer-rated"])
def test_refusals_name_the_exact_flags_or_conversion(tmp_path, row, flags, sentence):
    path = write_jsonl(tmp_path / "d.jsonl", [row] * 2)
    with pytest.raises(PreftuneError) as e:
        load_records(path, **flags)
    assert str(e.value) == f"{path} {sentence}"
