"""Request bodies without a server: messages as the chat template takes them, refused and checked fields."""

from __future__ import annotations

import pydantic
import pytest

from chattune.serving.schemas import ChatCompletionRequest, CompletionRequest, RequestError, template_messages


def chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest(model="m", **{"messages": [{"role": "user", "content": "hi"}], **fields})


def test_messages_become_role_and_text():
    parts = [{"type": "text", "text": "12 + "}, {"type": "text", "text": "34"}]
    body = chat(messages=[{"role": "developer", "content": "Be brief."}, {"role": "user", "content": parts}])
    assert template_messages(body.messages) == [{"role": "system", "content": "Be brief."},
                                                {"role": "user", "content": "12 + 34"}]
    with pytest.raises(RequestError) as e:
        template_messages(chat(messages=[{"role": "assistant", "content": None}]).messages)
    assert e.value.param == "messages.0.content"


def test_settings_become_the_engine_s_and_openai_defaults_apply():
    params = chat(max_completion_tokens=5, max_tokens=9, stop="x", seed=3, logit_bias={"7": -100}).sampling(50)
    assert (params.max_tokens, params.temperature, params.top_p, params.stop, params.seed, params.logit_bias) == \
        (5, 1.0, 1.0, ("x",), 3, {7: -100})
    with pytest.raises(RequestError, match="vocabulary has 50 tokens"):
        chat(logit_bias={"50": 1}).sampling(50)
    for bad in ({"a": 1}, {"1": 101}):
        with pytest.raises(pydantic.ValidationError):
            chat(logit_bias=bad)


@pytest.mark.parametrize("body, param", [
    (chat(n=2), "n"), (chat(frequency_penalty=0.5), "frequency_penalty"), (chat(top_logprobs=2), "top_logprobs"),
    (CompletionRequest(model="m", prompt="hi", echo=True), "echo"),
    (CompletionRequest(model="m", prompt="hi", best_of=3), "best_of"),
])
def test_fields_the_server_cannot_honour_are_refused_by_name(body, param):
    with pytest.raises(RequestError) as e:
        body.unsupported()
    assert (e.value.param, e.value.code) == (param, "unsupported_parameter")


def test_unused_fields_and_neutral_values_are_accepted():
    chat(n=1, presence_penalty=0, logprobs=False, user="u", tools=[], metadata={"a": "b"}).unsupported()
