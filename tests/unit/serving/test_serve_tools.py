"""Tool calling through `chattune serve` with the official `openai` client: a model that has learnt one tool
conversation calls `add`, gets the result back as a `tool` message and answers, streamed and not; tool_choice;
OpenAI-style 400s for bad tools. The parts that turn text into calls are also checked without a server."""

from __future__ import annotations

import json

import openai
import pytest

from chattune.demo.tools import ADD_TOOL
from chattune.serving import tools
from chattune.serving.schemas import ChatCompletionRequest, RequestError, template_messages

from conftest import TOOL_ORDER, TOOL_QUESTION, TOOL_RESULT

CALL_TEXT = '<tool_call>\n{"name": "add", "arguments": {"a": 12, "b": 34}}\n</tool_call>'
ANSWER = "The sum of 12 and 34 is 46."


def _request(**kw) -> ChatCompletionRequest:
    return ChatCompletionRequest(model="m", messages=kw.pop("messages", [{"role": "user", "content": "q"}]), **kw)


# ---- without a server: the request's tools, the reply's calls, the streamed deltas ---------------------------


def test_tool_choice_decides_what_is_rendered_parsed_and_forced():
    auto = tools.plan(_request(tools=[ADD_TOOL]))
    assert auto.tools == [ADD_TOOL] and auto.parse and not auto.reply_start and not auto.ban_call_tag
    none = tools.plan(_request(tools=[ADD_TOOL], tool_choice="none"))
    assert none.tools == [ADD_TOOL] and not none.parse and none.ban_call_tag
    assert tools.plan(_request(tools=[ADD_TOOL], tool_choice="required")).reply_start == "<tool_call>\n"
    named = tools.plan(_request(tools=[ADD_TOOL], tool_choice={"type": "function", "function": {"name": "add"}}))
    assert named.reply_start == '<tool_call>\n{"name": "add", "arguments":'
    plain = tools.plan(_request())
    assert plain.tools is None and not plain.parse and not plain.ban_call_tag


@pytest.mark.parametrize("kw,message", [
    ({"tool_choice": "sometimes", "tools": [ADD_TOOL]}, "tool_choice must be"),
    ({"tool_choice": "required"}, "has no tools"),
    ({"tool_choice": {"type": "function", "function": {"name": "mul"}}, "tools": [ADD_TOOL]}, "'mul'"),
    ({"tool_choice": {"type": "function"}, "tools": [ADD_TOOL]}, "tool_choice must be"),
    ({"tools": [ADD_TOOL, ADD_TOOL]}, "twice"),
])
def test_bad_tool_settings_name_the_field(kw, message):
    with pytest.raises(RequestError, match=message) as e:
        tools.plan(_request(**kw))
    assert e.value.param == ("tools" if "twice" in message else "tool_choice")


def test_reply_with_a_call_becomes_message_tool_calls():
    plan = tools.plan(_request(tools=[ADD_TOOL]))
    message, finish = tools.reply_message(plan, "Let me add them.\n" + CALL_TEXT, "stop", "call_x")
    assert finish == "tool_calls" and message["content"] == "Let me add them."
    assert message["tool_calls"] == [{"id": "call_x_0", "type": "function",
                                      "function": {"name": "add", "arguments": '{"a": 12, "b": 34}'}}]
    # a forced start is part of the reply; broken JSON stays text; without tools nothing is parsed
    named = tools.plan(_request(tools=[ADD_TOOL], tool_choice={"type": "function", "function": {"name": "add"}}))
    assert tools.reply_message(named, ' {"a": 1, "b": 2}}\n</tool_call>', "stop", "c")[0]["tool_calls"][0][
        "function"] == {"name": "add", "arguments": '{"a": 1, "b": 2}'}
    assert tools.reply_message(plan, "<tool_call>{oops</tool_call>", "stop", "c") == (
        {"role": "assistant", "content": "<tool_call>{oops</tool_call>"}, "stop")
    assert tools.reply_message(tools.plan(_request()), CALL_TEXT, "stop", "c")[0] == {"role": "assistant",
                                                                                      "content": CALL_TEXT}


def test_streamed_text_then_call_as_deltas_whatever_the_pieces():
    text = "Let me add them.\n" + CALL_TEXT
    for size in (1, 3, 7, len(text)):
        stream = tools.DeltaStream(tools.plan(_request(tools=[ADD_TOOL])), "call_s")
        deltas = [d for k in range(0, len(text), size) for d in stream.feed(text[k:k + size])]
        rest, finish = stream.finish("stop")
        deltas += rest
        content = "".join(d.get("content", "") for d in deltas)
        calls = [c for d in deltas for c in d.get("tool_calls", [])]
        assert content == "Let me add them." and finish == "tool_calls"
        assert calls[0] == {"index": 0, "id": "call_s_0", "type": "function",
                            "function": {"name": "add", "arguments": ""}}
        assert "".join(c["function"]["arguments"] for c in calls) == '{"a": 12, "b": 34}'
        assert all("content" not in d for d in deltas[deltas.index({"tool_calls": calls[:1]}):])


def test_request_messages_with_calls_and_results_become_canonical():
    msgs = [{"role": "user", "content": TOOL_QUESTION},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 12, "b": 34}'}}]},
            {"role": "tool", "tool_call_id": "c1", "content": TOOL_RESULT}]
    out = template_messages(_request(messages=msgs).messages)
    assert out[1] == {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "add", "arguments": {"a": 12, "b": 34}}}]}
    assert out[2] == {"role": "tool", "content": TOOL_RESULT, "tool_call_id": "c1", "name": "add"}


@pytest.mark.parametrize("bad,param", [
    (lambda m: [m[0], m[2]], "messages.1"),  # a result without a call
    (lambda m: [m[0], m[1], {**m[2], "tool_call_id": "nope"}], "messages.2.tool_call_id"),
    (lambda m: [m[0], {**m[1], "tool_calls": [{"function": {"name": "add", "arguments": "{x"}}]}, m[2]],
     "messages.1.tool_calls.0"),
    (lambda m: [{**m[0], "tool_calls": m[1]["tool_calls"]}], "messages.0.tool_calls"),
])
def test_bad_tool_messages_name_the_message(bad, param):
    msgs = [{"role": "user", "content": "q"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "add", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "1"}]
    with pytest.raises(RequestError) as e:
        template_messages(_request(messages=bad(msgs)).messages)
    assert e.value.param == param


# ---- through the server ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tool_server(start_server, tool_trained_dir, tmp_path_factory):
    s = start_server(tool_trained_dir, "--served-model-name", "tools", "--device", "cpu",
                     log=tmp_path_factory.mktemp("serve-tools") / "server.log").ready()
    yield s
    assert s.stop() == 0, s.log.read_text()[-3000:]


@pytest.fixture()
def client(tool_server):
    return openai.OpenAI(base_url=tool_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _ask(client, messages, **kw):
    return client.chat.completions.create(model="tools", messages=messages, tools=[ADD_TOOL], temperature=0,
                                          max_tokens=48, **kw)


def _streamed(client, messages, **kw) -> tuple[str, list[dict], str, list]:
    """(content, calls with their arguments joined from the deltas, finish reason, the deltas in order)."""
    content, calls, finish, deltas = "", {}, None, []
    for chunk in _ask(client, messages, stream=True, **kw):
        for choice in chunk.choices:
            d = choice.delta
            deltas.append(d)
            content += d.content or ""
            for c in d.tool_calls or []:
                call = calls.setdefault(c.index, {"id": None, "type": None, "name": "", "arguments": ""})
                call["id"], call["type"] = c.id or call["id"], c.type or call["type"]
                call["name"] += (c.function.name or "") if c.function else ""
                call["arguments"] += (c.function.arguments or "") if c.function else ""
            finish = choice.finish_reason or finish
    return content, [calls[k] for k in sorted(calls)], finish, deltas


def test_round_trip_call_then_result_then_answer(client):
    question = [{"role": "user", "content": TOOL_QUESTION}]
    first = _ask(client, question).choices[0]
    assert first.finish_reason == "tool_calls", first
    (call,) = first.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "add"
    assert json.loads(call.function.arguments) == {"a": 12, "b": 34}
    assert first.message.content == "Let me add them."
    # the client sends the assistant message back as it came, with the tool's result
    history = question + [first.message.model_dump(exclude_none=True),
                          {"role": "tool", "tool_call_id": call.id, "content": TOOL_RESULT}]
    second = _ask(client, history).choices[0]
    assert second.finish_reason == "stop" and second.message.tool_calls is None
    assert second.message.content == ANSWER


def test_streamed_round_trip_sends_text_first_then_the_call(client):
    question = [{"role": "user", "content": TOOL_QUESTION}]
    content, calls, finish, deltas = _streamed(client, question)
    assert finish == "tool_calls" and content == "Let me add them."
    (call,) = calls
    assert call["name"] == "add" and call["type"] == "function" and json.loads(call["arguments"]) == {"a": 12, "b": 34}
    first_call = next(k for k, d in enumerate(deltas) if d.tool_calls)
    assert any(d.content for d in deltas[:first_call]) and not any(d.content for d in deltas[first_call:])
    history = question + [{"role": "assistant", "content": content, "tool_calls": [
        {"id": call["id"], "type": "function", "function": {"name": "add", "arguments": call["arguments"]}}]},
        {"role": "tool", "tool_call_id": call["id"], "content": TOOL_RESULT}]
    content, calls, finish, _ = _streamed(client, history)
    assert (content, calls, finish) == (ANSWER, [], "stop")


def test_tool_choice_none_required_and_named(client):
    question = [{"role": "user", "content": TOOL_QUESTION}]
    none = _ask(client, question, tool_choice="none").choices[0]
    assert none.message.tool_calls is None and "<tool_call>" not in (none.message.content or "")
    order = [{"role": "user", "content": TOOL_ORDER}]
    for choice in ("auto", "required", {"type": "function", "function": {"name": "add"}}):
        forced = _ask(client, order, tool_choice=choice).choices[0]
        assert forced.finish_reason == "tool_calls" and forced.message.content is None, (choice, forced)
        assert json.loads(forced.message.tool_calls[0].function.arguments) == {"a": 20, "b": 22}
    hello = _ask(client, [{"role": "user", "content": "Hi!"}]).choices[0]
    assert hello.finish_reason == "stop" and hello.message.tool_calls is None and hello.message.content


@pytest.mark.parametrize("kw,param", [
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools.0.function.name"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools.0.function.name"),
    ({"tools": [{"type": "retrieval", "function": {"name": "add"}}]}, "tools.0.type"),
    ({"tools": [ADD_TOOL], "tool_choice": "always"}, "tool_choice"),
    ({"tools": [ADD_TOOL], "tool_choice": {"type": "function", "function": {"name": "mul"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [ADD_TOOL], "messages": [{"role": "tool", "tool_call_id": "x", "content": "1"}]}, "messages.0"),
])
def test_bad_tool_requests_are_openai_400s(client, kw, param):
    messages = kw.pop("messages", [{"role": "user", "content": TOOL_QUESTION}])
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tools", messages=messages, max_tokens=4, **kw)
    assert e.value.status_code == 400 and e.value.param == param, e.value.body
    assert e.value.type == "invalid_request_error"
