"""Tool calls at inference: the parser turns generated text into calls (invalid JSON stays text, counted); chat
sessions, `chat --tools` and `generate` rows with tools hand calls out and results back. The model's replies
are scripted (a real tiny GPT-2 whose generate() emits given text), so each test knows what the model "says"."""

from __future__ import annotations

import io
import json

import pytest
import torch

from chattune.commands.chat import piped, read_tools, run_chat
from chattune.commands.generate import run_generate
from chattune.demo import assets
from chattune.errors import ChattuneError
from chattune.inference.chat import ChatSession
from chattune.inference.generate import generate_replies
from chattune.inference.toolcalls import CallStream, parse_tool_calls
from chattune.model.load import load_chat_model

ADD = {"type": "function", "function": {"name": "add", "description": "Add two integers", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}}
CALL = '<tool_call>\n{"name": "add", "arguments": {"a": 12, "b": 34}}\n</tool_call>'


def test_parser_reads_calls_and_keeps_invalid_blocks_as_text():
    string_args = '<tool_call>\n{"name": "add", "arguments": "{\\"a\\": 1}"}\n</tool_call>'  # OpenAI's wire shape
    parsed = parse_tool_calls(f"Let me add.\n{CALL}\n{string_args}", id_prefix="call_7")
    assert parsed.content == "Let me add." and parsed.invalid == 0
    assert [c["function"] for c in parsed.tool_calls] == [{"name": "add", "arguments": {"a": 12, "b": 34}},
                                                          {"name": "add", "arguments": {"a": 1}}]
    assert [c["id"] for c in parsed.tool_calls] == ["call_7_0", "call_7_1"]
    # a block without its closing tag (generation stopped at the end-of-turn token) still counts
    assert parse_tool_calls(CALL.removesuffix("\n</tool_call>")).tool_calls[0]["function"]["name"] == "add"
    broken = '<tool_call>\n{"name": "add", "arguments": {"a": 1,}\n</tool_call>'
    parsed = parse_tool_calls(f"hmm {broken}")
    assert parsed.tool_calls == [] and parsed.invalid == 1 and parsed.content == f"hmm {broken}"
    assert parse_tool_calls("<tool_call>[1, 2]</tool_call>").invalid == 1  # JSON, but not a call
    assert parse_tool_calls("no call here") == parse_tool_calls("no call here ")


@pytest.mark.parametrize("text", [
    f"Let me add.\n{CALL}", f"{CALL}\n{CALL}", "plain text with a < sign and <tool", f"{CALL[:-5]}",
    '<tool_call>\n{"name": "add", "arguments": {"a": 1,}\n</tool_call> then text', "a <tool_call> never closed",
])
def test_streamed_parsing_gives_what_parsing_the_whole_text_gives(text):
    whole = parse_tool_calls(text)
    for size in (1, 2, 3, 7, 1000):
        stream, content, calls = CallStream(), [], []
        for k in range(0, len(text), size):
            for kind, value in stream.feed(text[k:k + size]):
                (content if kind == "content" else calls).append(value)
                assert kind != "content" or "<tool_call>" not in value or stream.invalid  # never a half-seen tag
        for kind, value in stream.finish():
            (content if kind == "content" else calls).append(value)
        assert calls == whole.tool_calls and stream.invalid == whole.invalid
        assert "".join(content).strip() == whole.content


class Script:
    """Replaces model.generate: each call appends the next scripted reply (text, then the end-of-turn token)."""

    def __init__(self, model, tokenizer, replies: list[str]):
        self.model, self.tok, self.replies, self.prompts = model, tokenizer, list(replies), []
        self.original = model.generate
        model.generate = self

    def __call__(self, input_ids, attention_mask=None, streamer=None, **kw):
        rows = []
        for row in input_ids.tolist():
            self.prompts.append(self.tok.decode([t for t in row if t != self.tok.pad_token_id]))
            reply = self.tok(self.replies.pop(0), add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]
            rows.append(row + reply)
            if streamer is not None:
                streamer.put(torch.tensor([row]))
                streamer.put(torch.tensor(reply))
                streamer.end()
        return torch.tensor(rows)


@pytest.fixture(scope="module")
def long_model_dir(tmp_path_factory, splits):
    """A base model with room for tool definitions (the session's trained model has a 128-token context)."""
    d = tmp_path_factory.mktemp("gpt2-long")
    assets.build_base_model(d, splits, n_layer=1, n_embd=32, n_head=2, n_positions=1024)
    return d


@pytest.fixture()
def scripted(long_model_dir):
    model, tok = load_chat_model(str(long_model_dir), "cpu")

    def make(replies):
        return model, tok, Script(model, tok, replies)

    yield make
    if isinstance(model.generate, Script):
        model.generate = model.generate.original


def test_a_chat_session_shows_tools_hands_results_back_and_continues(scripted):
    model, tok, script = scripted([CALL, "12 + 34 = 46."])
    session = ChatSession(model, tok, temperature=0, tools=[ADD])
    assert "".join(session.stream("What is 12 + 34?")) == CALL
    assert '"name": "add"' in script.prompts[0].split("<|im_end|>")[0]  # the definitions, in the system turn
    (call,) = session.pending_calls
    assert call["function"] == {"name": "add", "arguments": {"a": 12, "b": 34}}
    assert session.messages[-1] == {"role": "assistant", "content": "", "tool_calls": [call]}
    with pytest.raises(ChattuneError, match="give their results first"):
        list(session.stream("hello?"))
    assert "".join(session.stream_tool_results(['{"result": 46}'])) == "12 + 34 = 46."
    assert "<tool_response>\n{\"result\": 46}\n</tool_response>" in script.prompts[1]
    assert session.messages[-2] == {"role": "tool", "content": '{"result": 46}', "tool_call_id": call["id"],
                                    "name": "add"}
    assert session.pending_calls == [] and session.messages[-1]["content"] == "12 + 34 = 46."


def test_chat_cli_with_tools_file_takes_the_next_line_as_the_result(scripted, tmp_path, capsys):
    model, tok, script = scripted([CALL, "12 + 34 = 46."])
    session = ChatSession(model, tok, temperature=0, tools=read_tools(_tools_file(tmp_path)))
    out = io.StringIO()
    piped(session, ["What is 12 + 34?\n", '{"result": 46}\n'], out)
    assert out.getvalue() == f"{CALL}\n12 + 34 = 46.\n"
    assert 'tool call call_1_0: add({"a": 12, "b": 34}); type its result' in capsys.readouterr().err
    assert session.messages[-2]["role"] == "tool"


def _tools_file(tmp_path, value=None):
    path = tmp_path / "tools.json"
    path.write_text(json.dumps(value if value is not None else [ADD["function"]]))
    return str(path)


@pytest.mark.parametrize("value,message", [("not json", "not a JSON file"), ([{"description": "x"}], "no function "
                                                                                                     "name"),
                                           ([], "defines no tools")])
def test_a_bad_tools_file_is_one_line(tmp_path, value, message):
    path = tmp_path / "tools.json"
    path.write_text(value if isinstance(value, str) else json.dumps(value))
    with pytest.raises(ChattuneError, match=message):
        run_chat("never-loaded", message="hi", tools=str(path))


def test_generate_replies_parse_calls_for_conversations_with_tools(scripted):
    model, tok, _ = scripted(["just text", CALL])  # shortest prompt first: generate_replies batches by length
    out = generate_replies(model, tok, [[{"role": "user", "content": "add 12 and 34"}],
                                        [{"role": "user", "content": "hi"}]], tools=[[ADD], None], batch_size=1)
    assert out[0]["finish_reason"] == "tool_calls" and out[0]["content"] == ""
    assert out[0]["tool_calls"][0]["function"]["arguments"] == {"a": 12, "b": 34}
    assert "tool_calls" not in out[1] and out[1]["reply"] == "just text"


def test_generate_rows_carry_tools_in_and_wire_format_calls_out(scripted, tmp_path, monkeypatch):
    model, tok, script = scripted([CALL, "12 + 34 = 46."])
    monkeypatch.setattr("chattune.model.load.load_chat_model", lambda *a, **k: (model, tok))
    rows = [{"id": "a", "messages": [{"role": "user", "content": "add 12 and 34"}], "tools": [ADD["function"]]},
            {"id": "b", "tools": json.dumps([ADD]), "messages": [
                {"role": "user", "content": "add 12 and 34"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "x", "type": "function", "function": {"name": "add", "arguments": '{"a": 12, "b": 34}'}}]},
                {"role": "tool", "tool_call_id": "x", "content": "46"}]}]
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_generate("unused", str(src), str(dst), batch_size=1)
    first, second = [json.loads(line) for line in dst.read_text().splitlines()]
    assert first["finish_reason"] == "tool_calls" and first["tool_calls"] == [
        {"id": "call_0_0", "type": "function", "function": {"name": "add", "arguments": '{"a": 12, "b": 34}'}}]
    assert second["finish_reason"] == "stop" and second["tool_calls"] == [] and second["content"] == "12 + 34 = 46."
    assert "<tool_response>\n46\n</tool_response>" in script.prompts[1]  # the call and its result, rendered


def test_generate_rows_with_a_bad_call_are_one_line(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "",
                                                                              "tool_calls": [{"function": {
                                                                                  "name": "add", "arguments": "{x"}}]},
                                            {"role": "tool", "content": "1"}]}) + "\n")
    with pytest.raises(ChattuneError, match=r"in.jsonl line 1: .*not valid JSON"):
        run_generate("never-loaded", str(src), str(tmp_path / "out.jsonl"))
