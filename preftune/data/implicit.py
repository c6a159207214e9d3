"""Implicit prompts: rows with only chosen and rejected, whose shared beginning is the prompt.

The prompt must end where the assistant's turn begins, not wherever the two texts stop agreeing: in HH-RLHF
(``"\\n\\nHuman: Thanks!\\n\\nAssistant: You're welcome."`` vs ``"... You're welcome!"``) the shared characters
run into the reply, and a prompt ending in "Assistant: You're" would teach the model nothing about "You're" and
make every length-normalised loss see a different answer than the data holds. So:

* text with turn markers (HH-RLHF's ``\\n\\nHuman:`` / ``\\n\\nAssistant:``, or a rendered chat template:
  ChatML, Llama-3, Llama-2/Mistral ``[INST]``, Zephyr, Alpaca's ``### Response:``): the prompt ends right
  after the last assistant marker inside the shared text (for HH-RLHF this is the prompt the DPO authors'
  code cuts, ``extract_anthropic_prompt``), and both answers must be that one reply (an answer that still
  holds a user turn means the two sides differ earlier, and the row is refused);
* message lists: the prompt is the shared leading messages, and the first differing message must be the
  assistant's on both sides;
* text without any turn marker: the plain shared prefix, backed off to a word boundary (a "fallback", which
  `load_records` counts and reports).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class TurnStyle:
    name: str
    assistant: str  # the marker after which the assistant's reply begins
    user: str  # the marker that begins a user turn


TURN_STYLES = (
    TurnStyle("HH-RLHF", "\n\nAssistant:", "\n\nHuman:"),
    TurnStyle("ChatML", "<|im_start|>assistant\n", "<|im_start|>user"),
    TurnStyle("Llama-3", "<|start_header_id|>assistant<|end_header_id|>\n\n", "<|start_header_id|>user<|end_header_id|>"),
    TurnStyle("Llama-2", "[/INST]", "[INST]"),
    TurnStyle("Zephyr", "<|assistant|>\n", "<|user|>"),
    TurnStyle("Alpaca", "### Response:\n", "### Instruction:"),
)
USER_ROLES = ("user", "system")


def common_prefix_len(a: Sequence, b: Sequence) -> int:
    """Length of the longest common prefix, by binary search over C-speed slice comparisons."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def shared_word_prefix(chosen: str, rejected: str) -> int:
    """Where the plain shared prefix of two strings ends (0 if they share no whole word).

    Take the longest common prefix, back off to a whitespace boundary so no word is cut ("The answer is bl"
    becomes "The answer is "), then hand trailing spaces/tabs (not newlines) to the completions, as TRL's
    `extract_prompt` does: BPE vocabularies spell a word with its leading space (" Paris"), so the completion
    should start with it.
    """
    k = common_prefix_len(chosen, rejected)
    if k == len(chosen) == len(rejected):
        return k

    def boundary(i: int) -> bool:
        if i == 0 or chosen[i - 1].isspace():
            return True
        # the next character is a space in both strings (they may differ there only in which space it is)
        return i < len(chosen) and i < len(rejected) and chosen[i].isspace() and rejected[i].isspace()

    while k > 0 and not boundary(k):
        k -= 1
    while k > 0 and chosen[k - 1] in " \t":
        k -= 1
    return k


def split_text_prompt(chosen: str, rejected: str) -> tuple[int, str] | str:
    """(k, how): the prompt is ``chosen[:k]``; how is "turn" (after an assistant marker) or "prefix" (the plain
    shared prefix, for text without turn markers). A str is the reason the row has no usable prompt."""
    # both sides must use the style: one marker-like string in one answer is not a conversation
    styles = [s for s in TURN_STYLES if s.assistant in chosen and s.assistant in rejected]
    if not styles:
        k = shared_word_prefix(chosen, rejected)
        return (k, "prefix") if k else "chosen and rejected share no leading text, so there is no prompt"
    shared = common_prefix_len(chosen, rejected)
    best, end = None, -1
    for style in styles:
        at = chosen.rfind(style.assistant, 0, shared)  # a marker wholly inside the shared text
        if at >= 0 and at + len(style.assistant) > end:
            best, end = style, at + len(style.assistant)
    if best is None:
        marker = styles[0].assistant
        return f"chosen and rejected differ before the first {marker!r} turn, so there is no shared prompt"
    for side, text in (("chosen", chosen), ("rejected", rejected)):
        if best.user in text[end:]:
            return (f"chosen and rejected differ before the last assistant turn: {side} still holds a "
                    f"{best.user!r} turn after the shared prompt")
    return end, "turn"


def split_message_prompt(chosen: list[dict], rejected: list[dict]) -> int | str:
    """How many leading messages form the prompt, or the reason the row has no usable prompt."""
    k = common_prefix_len(chosen, rejected)
    if k == 0:
        return "chosen and rejected share no leading messages, so there is no prompt"
    for msgs in (chosen, rejected):
        if k < len(msgs) and msgs[k]["role"] in USER_ROLES:
            return (f"chosen and rejected differ in message {k + 1}, a {msgs[k]['role']} message; only the "
                    "assistant's reply may differ")
    return k
