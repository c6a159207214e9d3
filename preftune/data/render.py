"""Turn a loaded record into the texts the tokenizer sees: prompt text and completion text(s).

Standard (string) records pass through unchanged. Conversational records (message lists) are rendered with
the tokenizer's chat template:

    prompt_text = template(prompt, add_generation_prompt=True)
    full_text   = template(prompt + answer)
    completion  = full_text[len(prompt_text):]

This needs the template to be *prefix-stable*: the rendered prompt must be a prefix of the rendered full
conversation, otherwise the completion's tokens cannot be told from the prompt's. Templates that rewrite
earlier turns once an answer follows (some strip reasoning from past assistant turns, some stamp the date)
are refused with a `PreftuneError` instead of training on misaligned labels.

A template that closes the assistant turn with EOS (Llama-2, Mistral, Zephyr) leaves it in the completion
text, often followed by whitespace ("Blue.</s>\n"); `preftune.data.tokenize.answer_text` makes that EOS the
answer's one EOS and drops what follows it.

Special tokens: a rendered prompt usually starts with the template's BOS string (e.g. "<s>"). The
tokenization code therefore encodes chat-rendered text with ``add_special_tokens=False`` so that BOS is not
added twice; standard string records are encoded with the tokenizer's own special tokens.

A record's ``tools`` (tool schemas) go to the template with every render, as TRL passes them; the template is
run by `preftune.data.chat_template` under a time and a size limit, so a template that loops or balloons costs
one sentence.
"""

from __future__ import annotations

from typing import Any

from preftune.data.chat_template import TemplateLimit, render_chat, time_limit
from preftune.errors import PreftuneError


def is_conversational(record: dict) -> bool:
    """Whether a record holds message lists (rendered with the chat template) rather than plain strings."""
    return any(isinstance(record.get(k), list) for k in ("prompt", "chosen", "rejected", "completion"))


def render_texts(tokenizer: Any, record: dict) -> tuple[str, str, str]:
    """(prompt_text, chosen_text, rejected_text) of a preference record; the completions exclude the prompt.

    Chat-rendered texts may begin with the BOS token string: encode them with ``add_special_tokens=False``.
    """
    prompt, chosen, rejected = record["prompt"], record["chosen"], record["rejected"]
    if not is_conversational(record):
        return prompt, chosen, rejected
    prompt_msgs, tools = _as_messages(prompt, "user"), record.get("tools")
    with time_limit():
        prompt_text = _render(tokenizer, prompt_msgs, True, prompt_msgs, tools)
        chosen_text = _completion(tokenizer, prompt_msgs, prompt_text, _as_messages(chosen, "assistant"), "chosen",
                                  tools)
        rejected_text = _completion(tokenizer, prompt_msgs, prompt_text, _as_messages(rejected, "assistant"),
                                    "rejected", tools)
    return prompt_text, chosen_text, rejected_text


def render_sft_texts(tokenizer: Any, record: dict) -> tuple[str, str]:
    """(prompt_text, completion_text) of an SFT record, rendered like `render_texts`."""
    prompt, completion = record["prompt"], record["completion"]
    if not is_conversational(record):
        return prompt, completion
    prompt_msgs, tools = _as_messages(prompt, "user"), record.get("tools")
    with time_limit():
        prompt_text = _render(tokenizer, prompt_msgs, True, prompt_msgs, tools)
        completion_text = _completion(tokenizer, prompt_msgs, prompt_text, _as_messages(completion, "assistant"),
                                      "completion", tools)
    return prompt_text, completion_text


def _as_messages(value: str | list[dict], role: str) -> list[dict]:
    # The loader normalises a record to one shape, but a hand-built record may mix a string prompt with
    # message completions; treat the string as one message of the natural role.
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return value


def _completion(tokenizer: Any, prompt_msgs: list[dict], prompt_text: str, answer: list[dict], which: str,
                tools: list[dict] | None) -> str:
    full = _render(tokenizer, prompt_msgs + answer, False, prompt_msgs, tools)
    if not full.startswith(prompt_text):
        at = next(
            (i for i, (a, b) in enumerate(zip(prompt_text, full)) if a != b), min(len(prompt_text), len(full))
        )
        raise PreftuneError(
            f"the chat template is not prefix-stable: for the row beginning {_beginning(prompt_msgs)}, "
            f"the rendered prompt (with the generation prompt) is not a prefix of the rendered "
            f"prompt + {which} conversation (they differ at character {at}: "
            f"{prompt_text[at : at + 30]!r} vs {full[at : at + 30]!r}); use a template "
            "that renders the prompt as a prefix, or standard string data"
        )
    return full[len(prompt_text) :]


def _render(tokenizer: Any, messages: list[dict], add_generation_prompt: bool, prompt_msgs: list[dict],
            tools: list[dict] | None) -> str:
    if getattr(tokenizer, "chat_template", None) is None:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise PreftuneError(
            f"the tokenizer {name} has no chat template, so conversational (message-list) data "
            "cannot be rendered; "
            "set tokenizer.chat_template or use standard string data"
        )
    try:
        text = render_chat(tokenizer, messages, add_generation_prompt=add_generation_prompt, tools=tools)
    except TemplateLimit as e:
        raise PreftuneError(f"the chat template {e.what} (on the row beginning {_beginning(prompt_msgs)}); a "
                            "template that loops or builds text without end is not usable: fix or replace it") from None
    except (Exception, RecursionError) as e:  # jinja raises TemplateError ("roles must alternate") and others
        raise PreftuneError(
            f"the chat template failed on the row beginning {_beginning(prompt_msgs)}: "
            f"{str(e).strip()[:300] or type(e).__name__}"
        ) from None
    return text


def _beginning(messages: list[dict], width: int = 60) -> str:
    text = " ".join(str(m.get("content", "")) for m in messages if isinstance(m, dict))
    text = " ".join(text.split())
    return repr(text[:width] + ("..." if len(text) > width else ""))
