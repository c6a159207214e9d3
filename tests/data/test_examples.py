"""Examples as training sees them (preftune.data.examples), with a word-level tokenizer so that every token piece
can be written down by hand."""

from __future__ import annotations

from preftune.data.examples import examples_from_records, format_example

from .test_render import conv, tiny_tokenizer


def test_conversational_example_shows_the_template_and_its_eos():
    """TEMPLATE renders prompt "<s><|user|> what color is the sky <|assistant|> " and the answer
    "the sky is blue </s> "; the space after "</s>" is not trained, so the answer is "the sky is blue </s>".
    Word pieces: prompt <s> <|user|> what color is the sky <|assistant|> (8), chosen the sky is blue </s> (5,
    EOS from the text), rejected the sky is green </s> (5)."""
    tok = tiny_tokenizer()
    (ex,) = examples_from_records([conv("what color is the sky", "the sky is blue", "the sky is green")],
                                  ["d.jsonl line 1"], 1, tokenizer=tok)
    prompt_pieces = ["<s>", "<|user|>", "what", "color", "is", "the", "sky", "<|assistant|>"]
    assert ex["prompt"] == "<s><|user|> what color is the sky <|assistant|> "
    assert (ex["chosen"], ex["rejected"]) == ("the sky is blue </s>", "the sky is green </s>")
    assert ex["tokens"] == {
        "prompt": 8, "prompt_end": prompt_pieces,
        "chosen": 5, "chosen_eos": "in the text", "chosen_start": ["the", "sky", "is", "blue", "</s>"],
        "chosen_end": ["the", "sky", "is", "blue", "</s>"],
        "rejected": 5, "rejected_eos": "in the text", "rejected_start": ["the", "sky", "is", "green", "</s>"],
        "rejected_end": ["the", "sky", "is", "green", "</s>"],
    }
    assert format_example(ex, "example 1") == [
        "example 1 (d.jsonl line 1):",
        "  prompt   '<s><|user|> what color is the sky <|assistant|> '",
        "  chosen   'the sky is blue </s>'",
        "  rejected 'the sky is green </s>'",
        "  tokens   prompt 8, chosen 5 (EOS in the text), rejected 5 (EOS in the text)",
        "  chosen start    '<s>' '<|user|>' 'what' 'color' 'is' 'the' 'sky' '<|assistant|>' | "
        "'the' 'sky' 'is' 'blue' '</s>'",
        "  rejected start  '<s>' '<|user|>' 'what' 'color' 'is' 'the' 'sky' '<|assistant|>' | "
        "'the' 'sky' 'is' 'green' '</s>'",
        "  chosen end      'the' 'sky' 'is' 'blue' '</s>'",
        "  rejected end    'the' 'sky' 'is' 'green' '</s>'",
    ]


def test_string_example_eos_added_cut_off_and_dropped():
    """Standard strings: EOS is appended ("added"); with max_length 4 and a 2-token prompt each answer keeps 2
    tokens: "the sky is blue"+EOS becomes "the sky" ("cut off by max_length"), and "the sky"+EOS next to it
    also becomes "the sky": identical, shown as dropped with the reason."""
    tok = tiny_tokenizer(None)
    records = [{"prompt": "what color", "chosen": " blue", "rejected": " green"},
               {"prompt": "what color", "chosen": " the sky is blue", "rejected": " green"},
               {"prompt": "what color", "chosen": " the sky is blue", "rejected": " the sky"}]
    exs = examples_from_records(records, ["a", "b", "c"], 3, tokenizer=tok, max_length=4, max_prompt_length=2)
    assert [exs[0]["tokens"][k] for k in ("chosen", "chosen_eos", "chosen_end")] == [2, "added", ["blue", "</s>"]]
    assert [exs[1]["tokens"][k] for k in ("chosen", "chosen_eos", "chosen_end")] == [2, "cut off by max_length",
                                                                                      ["the", "sky"]]
    assert exs[2]["tokens"] == {"dropped": "chosen and rejected identical after truncation: no signal"}
    assert format_example(exs[2], "example 3")[-1] == (
        "  dropped by tokenization: chosen and rejected identical after truncation: no signal")


def test_without_a_tokenizer_the_records_are_shown():
    (ex,) = examples_from_records([conv("q", "a", "b")], ["x line 1"], 5)
    assert ex == {"where": "x line 1", "prompt": "user: q", "chosen": "assistant: a", "rejected": "assistant: b",
                  "note": "no tokenizer: messages shown as role: content, chat template not applied"}
    long = {"prompt": "p" * 50, "chosen": "c", "rejected": "r"}
    lines = format_example(examples_from_records([long], ["y"], 1)[0], "ex", limit=10)
    assert lines[1] == "  prompt   'ppppp' [... 40 characters ...] 'ppppp'"
