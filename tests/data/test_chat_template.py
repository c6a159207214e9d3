"""Bounded template rendering (preftune.data.chat_template) gives exactly `apply_chat_template`'s text on templates
written in the style of common model families (ChatML with a default system turn, Llama-2 with its role check,
one using namespace/loop controls/dict/tojson/{% generation %}, one with tools)."""

from __future__ import annotations

import jinja2
import pytest

from preftune.data.chat_template import render_chat

from .test_public_layouts import TOOL_TEMPLATE, TOOLS
from .test_render import TEMPLATE, tiny_tokenizer

CHATML = ("{%- for message in messages %}{%- if loop.first and message['role'] != 'system' %}"
          "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
          "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{%- endfor %}"
          "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}")
LLAMA2 = ("{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
          "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
          "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
          "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
          "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
          "{% if loop.index0 == 0 and system_message != false %}"
          "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
          "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
          "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
          "{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")
HELPERS = ("{%- set ns = namespace(n=0) %}{%- for m in messages %}{%- set ns.n = ns.n + 1 %}"
           "{%- if m.role == 'system' %}{% continue %}{% endif %}{{ m.role | upper }}: "
           "{% generation %}{{ m.content | trim }}{% endgeneration %}{{ '\\n' }}{%- endfor %}"
           "{{ dict(turns=ns.n) | tojson }}{% if add_generation_prompt %} ASSISTANT:{% endif %}")
CHAT = [{"role": "system", "content": "Be brief & <kind>."}, {"role": "user", "content": " What's 2+2? "},
        {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}]


@pytest.mark.parametrize("template", [TEMPLATE, CHATML, LLAMA2, HELPERS, TOOL_TEMPLATE],
                         ids=["tiny", "chatml", "llama2", "helpers", "tools"])
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_same_text_as_apply_chat_template(template, generation_prompt):
    tok = tiny_tokenizer(template)
    tools = TOOLS if template is TOOL_TEMPLATE else None
    for messages in (CHAT, CHAT[1:], CHAT[1:3]):
        want = tok.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=generation_prompt)
        assert render_chat(tok, messages, add_generation_prompt=generation_prompt, tools=tools) == want


def test_the_template_errors_and_sandbox_stay():
    with pytest.raises(jinja2.exceptions.TemplateError, match="roles must alternate"):
        render_chat(tiny_tokenizer(LLAMA2), CHAT[1:2] * 2, add_generation_prompt=True)
    with pytest.raises(jinja2.exceptions.SecurityError):
        render_chat(tiny_tokenizer("{{ messages.__class__.__mro__ }}"), CHAT, add_generation_prompt=False)
