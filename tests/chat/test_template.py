"""Chat templates: rendering, message normalisation, template errors and the sandbox."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jinja2
import pytest

from modelyard.chat.template import (
    FALLBACK_TEMPLATE,
    ChatTemplate,
    TemplateError,
    normalize_message,
)

# A ChatML template the way GGUF files carry them (with a default system prompt).
CHATML = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ bos_token }}<|im_start|>system\nYou are helpful.<|im_end|>\n"
    "{% else %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_render_with_generation_prompt() -> None:
    template = ChatTemplate(CHATML, bos_token="<s>")
    prompt = template.render([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
    ])
    assert prompt == (
        "<s><|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_render_without_generation_prompt() -> None:
    prompt = ChatTemplate(CHATML).render([{"role": "user", "content": "Hi"}],
                                          add_generation_prompt=False)
    assert prompt == (
        "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    )


@pytest.mark.parametrize("source", [None, ""])
def test_no_template_falls_back_to_chatml(source: str | None) -> None:
    template = ChatTemplate(source)
    assert template.source == FALLBACK_TEMPLATE
    assert template.render([{"role": "user", "content": "Hi"}]) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_developer_role_becomes_system() -> None:
    prompt = ChatTemplate(CHATML).render([
        {"role": "developer", "content": "Rules."},
        {"role": "user", "content": "Hi"},
    ])
    assert prompt.startswith("<|im_start|>system\nRules.<|im_end|>\n")
    assert "developer" not in prompt
    assert "You are helpful." not in prompt   # the template saw a system message first


def test_list_content_parts_are_joined() -> None:
    prompt = ChatTemplate(None).render([{"role": "user", "content": [
        {"type": "text", "text": "first"},
        {"type": "text", "text": "second"},
    ]}])
    assert "<|im_start|>user\nfirst\nsecond<|im_end|>" in prompt


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ({"role": "developer", "content": "x"}, {"role": "system", "content": "x"}),
        ({"role": "user", "content": [{"type": "text", "text": "a"},
                                      {"type": "image_url", "image_url": {}},
                                      {"type": "text", "text": "b"}]},
         {"role": "user", "content": "a\nb"}),
        ({"role": "user", "content": []}, {"role": "user", "content": ""}),
        ({"role": "tool", "content": None}, {"role": "tool", "content": ""}),
        ({"role": "assistant", "content": None, "tool_calls": [{"id": "c"}]},
         {"role": "assistant", "content": None, "tool_calls": [{"id": "c"}]}),
        ({"role": "assistant"}, {"role": "assistant"}),
    ],
)
def test_normalize_message(message: dict[str, Any], expected: dict[str, Any]) -> None:
    original = json.loads(json.dumps(message))
    assert normalize_message(message) == expected
    assert message == original   # the caller's dict is not changed


def test_special_tokens_and_extra_variables_reach_the_template() -> None:
    template = ChatTemplate("{{ bos_token }}|{{ eos_token }}|{{ tools | tojson }}",
                            bos_token="<s>", eos_token="</s>")
    assert template.render([], tools=[{"name": "é"}]) == '<s>|</s>|[{"name": "é"}]'


def test_tojson_indent_like_hugging_face() -> None:
    template = ChatTemplate("{{ messages[0] | tojson(indent=2) }}")
    assert template.render([{"role": "user", "content": "x"}]) == json.dumps(
        {"role": "user", "content": "x"}, indent=2)


def test_namespace_and_loop_variables_work_as_in_hugging_face_templates() -> None:
    template = ChatTemplate(
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
        "{{ m['content'] | trim }}{% if not loop.last %},{% endif %}{% endfor %}={{ ns.n }}"
    )
    messages = [{"role": "user", "content": " a "}, {"role": "assistant", "content": "b"}]
    assert template.render(messages) == "a,b=2"


def test_strftime_now_is_available() -> None:
    assert ChatTemplate("{{ strftime_now('%Y') }}").render([]).isdigit()


def test_raise_exception_becomes_template_error() -> None:
    template = ChatTemplate(
        "{% for m in messages %}{% if m['role'] == 'tool' %}"
        "{{ raise_exception('tool messages are not supported') }}"
        "{% endif %}{% endfor %}ok"
    )
    assert template.render([{"role": "user", "content": "x"}]) == "ok"
    with pytest.raises(TemplateError, match=r"^tool messages are not supported$"):
        template.render([{"role": "tool", "content": "x"}])


def test_jinja_errors_while_rendering_become_template_error() -> None:
    with pytest.raises(TemplateError, match="chat template failed"):
        ChatTemplate("{{ messages[0]['content'] }}").render([])


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.__class__ }}{{ raise_exception.__globals__ }}x{{ (1).__class__.__base__ }}"
        "{{ ''.__class__.__mro__ }}",
        "{{ cycler.__init__.__globals__.os.system('id') }}",
        "{{ raise_exception.__globals__['__builtins__'] }}",
        "{% set _ = messages.append({'role': 'user'}) %}",       # immutable sandbox
        "{% set _ = messages[0].update({'role': 'system'}) %}",
    ],
)
def test_sandbox_refuses_unsafe_access(source: str) -> None:
    with pytest.raises(TemplateError, match="unsafe"):
        ChatTemplate(source).render([{"role": "user", "content": "x"}])


PAYLOAD = "{{ cycler.__init__.__globals__.__builtins__.__import__('os').mkdir(path) }}"


def test_sandbox_never_runs_code(tmp_path: Path) -> None:
    # The payload is live: outside the sandbox it writes a file.
    unsandboxed = tmp_path / "unsandboxed"
    jinja2.Environment().from_string(PAYLOAD).render(path=str(unsandboxed))
    assert unsandboxed.is_dir()

    sandboxed = tmp_path / "sandboxed"
    with pytest.raises(TemplateError, match="unsafe"):
        ChatTemplate(PAYLOAD).render([{"role": "user", "content": "x"}], path=str(sandboxed))
    assert not sandboxed.exists()


def test_sandbox_error_is_modelyards_template_error_not_jinjas() -> None:
    with pytest.raises(TemplateError) as info:
        ChatTemplate("{{ ''.__class__.__mro__ }}").render([])
    assert type(info.value) is TemplateError
    assert isinstance(info.value.__cause__, jinja2.sandbox.SecurityError)
