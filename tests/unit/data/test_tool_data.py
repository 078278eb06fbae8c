"""Tool use in data: converters fill tools, calls and results; checks explain bad ones; the template shows the
definitions in the system turn, trains on calls and never on results."""

from __future__ import annotations

import json

import pytest
from datasets import Dataset

from chattune.data import load_conversations
from chattune.data.loading import canonical_features, concat_splits
from chattune.data.template import CALL_START, prepare_tokenizer
from chattune.data.tokenize import prepare_split
from chattune.data.tools import normalize_tools, rows_of, to_arrow
from chattune.errors import ChattuneError, DataError
from chattune.outputs import IGNORE_INDEX

from conftest import SHARED_DATA

ADD = {"name": "add", "description": "Add two integers", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}


def sharegpt_row(call='{"name": "add", "arguments": {"a": 12, "b": 34}}', tools=json.dumps([ADD])):
    return {"conversations": [{"from": "human", "value": "what is 12 + 34"}, {"from": "function_call", "value": call},
                              {"from": "observation", "value": '{"sum": 46}'}, {"from": "gpt", "value": "46."}],
            "tools": tools}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_sharegpt_function_call_and_observation_become_a_call_and_its_result(tmp_path):
    loaded = load_conversations(write_jsonl(tmp_path / "d.jsonl", [sharegpt_row()]), "train")
    assert "tools" not in loaded.info.get("ignored_columns", [])
    (conv,), (tools,) = rows_of(loaded.dataset[:])
    assert tools == [{"type": "function", "function": ADD}]  # the bare shape, normalized to OpenAI's
    assert conv[1] == {"role": "assistant", "content": "", "tool_calls": [
        {"id": None, "type": "function", "function": {"name": "add", "arguments": {"a": 12, "b": 34}}}]}
    assert conv[2] == {"role": "tool", "content": '{"sum": 46}', "name": "add"}


def test_openai_messages_with_string_arguments_and_a_tools_list(tmp_path):
    row = {"messages": [
        {"role": "user", "content": "add 1 and 2"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "3"},
        {"role": "assistant", "content": "3"}], "tools": [{"type": "function", "function": ADD}]}
    plain = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    loaded = load_conversations(write_jsonl(tmp_path / "d.jsonl", [row, plain]), "train")
    convs, tools = rows_of(loaded.dataset[:])
    assert convs[0][1]["tool_calls"][0]["function"]["arguments"] == {"a": 1, "b": 2}  # a dict in canonical data
    assert convs[0][1]["content"] == "" and convs[0][2]["tool_call_id"] == "call_1"
    assert convs[1] == plain["messages"] and tools[1] is None  # plain rows keep only role and content


def test_plain_data_keeps_the_plain_schema(tmp_path):
    plain = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    loaded = load_conversations(write_jsonl(tmp_path / "d.jsonl", [plain]), "train")
    assert loaded.dataset.features == canonical_features("messages")  # the fast Arrow paths read this schema


@pytest.mark.parametrize("row,kind,text", [
    (sharegpt_row(call='{"name": "add", "arguments": "{a: 1}"}'), "invalid tool call", "not valid JSON"),
    (sharegpt_row(call='{"arguments": {"a": 1}}'), "invalid tool call", "no function name"),
    (sharegpt_row(call='{"name": "add", "arguments": [1, 2]}'), "invalid tool call", "expected a JSON object"),
    (sharegpt_row(tools='[{"description": "x"}]'), "invalid tools", "no function name"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"},
                        {"from": "observation", "value": "42"}, {"from": "gpt", "value": "b"}]},
     "tool result without call", "follows no assistant tool call"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "function": {"name": "add", "arguments": "{}"}}]}, {"role": "tool", "tool_call_id": "c9",
                                                                         "content": "1"}]},
     "tool result without call", "tool_call_id 'c9'"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "add", "arguments": "{}"}}]}, {"role": "user", "content": "and?"},
                   {"role": "assistant", "content": "x"}]}, "unanswered tool call", "not its result"),
])
def test_bad_tool_rows_are_explained(tmp_path, row, kind, text):
    with pytest.raises(DataError) as err:
        load_conversations(write_jsonl(tmp_path / "d.jsonl", [row]), "train")
    assert f"{kind}: 1" in str(err.value) and text in str(err.value) and "d.jsonl line 1" in str(err.value)


def test_a_conversation_may_end_with_a_call_and_content_may_be_empty_beside_it(tmp_path):
    row = {"messages": [{"role": "user", "content": "add 1 and 2"}, {"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "add", "arguments": {"a": 1, "b": 2}}}]}], "tools": [ADD]}
    assert len(load_conversations(write_jsonl(tmp_path / "d.jsonl", [row]), "train").dataset) == 1


def test_undeclared_calls_are_counted_or_rejected_with_strict_tools(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [sharegpt_row(call='{"name": "mul", "arguments": {}}'), sharegpt_row()])
    loaded = load_conversations(path, "train")
    assert len(loaded.dataset) == 2 and loaded.info["undeclared_tool_calls"] == [
        f"{path} line 1: calls 'mul' without declaring it in its tools"]
    with pytest.raises(DataError, match=r"undeclared tool: 1(.|\n)*line 1: message 1 calls 'mul'"):
        load_conversations(path, "train", strict_tools=True)


def test_plain_and_tool_sources_mix(tmp_path, ultrachat_dir):
    tool = load_conversations(write_jsonl(tmp_path / "d.jsonl", [sharegpt_row()]), "train")
    plain = load_conversations(str(ultrachat_dir), "test_gen")
    mixed = concat_splits([plain.dataset, tool.dataset], {"messages", "sharegpt"}, "mix", [], set())
    convs, tools = rows_of(mixed.dataset[:])
    assert len(convs) == len(plain.dataset) + 1 and tools[0] is None and tools[-1][0]["function"]["name"] == "add"
    assert convs[0] == plain.dataset[0]["messages"]


def test_tools_normalize_from_both_shapes_and_json_strings():
    openai = [{"type": "function", "function": ADD}]
    assert normalize_tools(json.dumps([ADD])) == normalize_tools([ADD]) == normalize_tools(openai) == openai
    assert normalize_tools("[]") is None and normalize_tools(None) is None


def _tool_rows(tokenizer, rows, max_length=None):
    pairs = [to_arrow(c, t) for c, t in zip(*rows)]
    ds = Dataset.from_dict({"messages": [m for m, _ in pairs], "tools": [t for _, t in pairs]},
                           features=canonical_features("messages", tools=True))
    return prepare_split(ds, tokenizer, max_length)[0]


def test_tool_definitions_in_the_system_turn_calls_trained_results_not(tiny_tokenizer, tmp_path):
    setup = prepare_tokenizer(tiny_tokenizer)
    assert {"<tool_call>", "</tool_call>"} <= set(setup.added_tokens)
    loaded = load_conversations(write_jsonl(tmp_path / "d.jsonl", [sharegpt_row()]), "train")
    rows = _tool_rows(tiny_tokenizer, rows_of(loaded.dataset[:]))
    ids, labels = rows["input_ids"][0], rows["labels"][0]
    text = tiny_tokenizer.decode(ids)
    system = text[:text.index("<|im_end|>")]
    assert system.startswith("<|im_start|>system\n") and json.dumps({"type": "function", "function": ADD}) in system
    trained = tiny_tokenizer.decode([t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX])
    assert trained == ('<tool_call>\n{"name": "add", "arguments": {"a": 12, "b": 34}}\n</tool_call><|im_end|>'
                       "46.<|im_end|>")
    assert '<|im_start|>user\n<tool_response>\n{"sum": 46}\n</tool_response><|im_end|>' in text
    # the call tag is one token, and a plain (not special) one: decoded replies keep it for the parser
    call_id = tiny_tokenizer.convert_tokens_to_ids(CALL_START)
    assert call_id in ids and CALL_START in tiny_tokenizer.decode([call_id], skip_special_tokens=True)


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not present")
def test_glaive_trains_on_calls_with_its_tool_definitions_and_never_on_results(tiny_tokenizer):
    prepare_tokenizer(tiny_tokenizer)
    glaive = load_conversations(str(SHARED_DATA / "glaive_toolcall_en_demo.json"), "train")
    convs, tools = rows_of(glaive.dataset[:])
    i = next(k for k, c in enumerate(convs) if any(m.get("tool_calls") for m in c))
    rows = _tool_rows(tiny_tokenizer, ([convs[i]], [tools[i]]))
    ids, labels = rows["input_ids"][0], rows["labels"][0]
    text = tiny_tokenizer.decode(ids)
    system = text[:text.index("<|im_end|>")]
    for tool in tools[i]:  # every definition, as JSON, in the system turn
        assert json.dumps(tool, ensure_ascii=False) in system
    # label runs: each trained run is one assistant message; tool results are never inside one
    runs, current = [], []
    for t, lab in zip(ids, labels):
        if lab != IGNORE_INDEX:
            current.append(t)
        elif current:
            runs.append(tiny_tokenizer.decode(current))
            current = []
    calls = [m for m in convs[i] if m.get("tool_calls")]
    call_runs = [r for r in runs if r.startswith("<tool_call>")]
    assert len(call_runs) == len(calls) and all(r.endswith("</tool_call><|im_end|>") for r in call_runs)
    assert json.loads(call_runs[0][len("<tool_call>\n"):-len("\n</tool_call><|im_end|>")]) == {
        "name": calls[0]["tool_calls"][0]["function"]["name"],
        "arguments": calls[0]["tool_calls"][0]["function"]["arguments"]}
    results = [m["content"] for m in convs[i] if m["role"] == "tool"]
    assert results and not any(res in run for res in results for run in runs)
    assert all(res in text for res in results)


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not present")
def test_data_inspect_on_glaive_shows_the_definitions_in_the_prompt_and_marks_only_calls(capsys, model_dir):
    from chattune.cli import main

    glaive = str(SHARED_DATA / "glaive_toolcall_en_demo.json")
    convs, tools = rows_of(load_conversations(glaive, "train").dataset[:])
    i = next(k for k, c in enumerate(convs) if any(m.get("tool_calls") for m in c))
    assert main(["data", "inspect", "--model", str(model_dir), "--dataset", glaive, "--example", str(i)]) == 0
    out = capsys.readouterr().out
    assert "conversations declare tools" in out and "# Tools" in out
    system = out[out.index("example "):out.index("<|im_end|>")]
    assert all(t["function"]["name"] in system for t in tools[i])  # the definitions, in the system turn
    assert "⟦<tool_call>" in out and "</tool_call><|im_end|>⟧" in out  # calls trained on
    result = next(m["content"] for m in convs[i] if m["role"] == "tool")
    marked = [part.split("⟧")[0] for part in out.split("⟦")[1:]]
    assert result[:20] in out and not any(result[:20] in m for m in marked)  # results shown, never trained on


TOOL_TEMPLATE = (  # a model's own template that takes tools= and tool_calls, with generation tags
    "{% if tools %}{{ 'TOOLS ' + (tools | tojson) + '\n' }}{% endif %}{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}{{ 'A: ' }}{% generation %}{{ m['content'] }}"
    "{% for c in m['tool_calls'] or [] %}{{ 'CALL ' + (c['function'] | tojson) }}{% endfor %}{{ eos_token }}"
    "{% endgeneration %}{{ '\n' }}{% else %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}A: {% endif %}")


def test_a_model_template_receives_tools_and_one_that_ignores_them_is_refused(tiny_tokenizer, tmp_path):
    loaded = load_conversations(write_jsonl(tmp_path / "d.jsonl", [sharegpt_row()]), "train")
    tiny_tokenizer.chat_template = TOOL_TEMPLATE
    prepare_tokenizer(tiny_tokenizer)
    rows = prepare_split(loaded.dataset, tiny_tokenizer, None)[0]
    text = tiny_tokenizer.decode(rows["input_ids"][0])
    assert text.startswith("TOOLS [") and '"name": "add"' in text.splitlines()[0]
    trained = tiny_tokenizer.decode([t for t, lab in zip(rows["input_ids"][0], rows["labels"][0]) if lab != -100])
    assert '"arguments": {"a": 12, "b": 34}' in trained and '{"sum": 46}' not in trained
    tiny_tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + eos_token }}"
                                    "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(ChattuneError, match="ignores tool definitions .* conversation 0"):
        prepare_split(loaded.dataset, tiny_tokenizer, None)


def test_data_validate_counts_undeclared_calls_and_strict_tools_rejects_them(tmp_path):
    from chattune.config import Config
    from chattune.data.inspect import format_validate, validate_data

    cfg = Config()
    cfg.data.dataset = write_jsonl(tmp_path / "d.jsonl", [sharegpt_row(call='{"name": "mul", "arguments": {}}'),
                                                          sharegpt_row()])  # a usable row: a source without raises
    r = validate_data(cfg)
    assert r["ok"] and "1 conversation(s) call a function their tools do not declare" in format_validate(r)
    cfg.data.strict_tools = True
    r = validate_data(cfg)
    assert not r["ok"] and r["problems"] == {"undeclared tool": 1}
