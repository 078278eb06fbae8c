"""Loading, normalizing and validating chat data before any model is loaded."""

from __future__ import annotations

import json

import pytest

from chattune.data import holdout_split, load_conversations
from chattune.data.formats import detect_format
from chattune.data.sources import list_splits
from chattune.data.validate import check_messages
from chattune.errors import DataError


def test_ultrachat_layout_becomes_canonical_messages_with_final_reply(ultrachat_dir, splits):
    assert set(list_splits(str(ultrachat_dir))) == {"train_gen", "test_gen"}
    loaded = load_conversations(str(ultrachat_dir), "train_gen")
    assert loaded.format == "messages"
    # prompt and prompt_id are dropped: TRL would read a 'prompt' column as prompt/completion data
    assert loaded.dataset.column_names == ["messages"]
    first = loaded.dataset[0]["messages"]
    assert first == splits["train_gen"][0]["messages"]
    assert first[-1]["role"] == "assistant"  # the final reply is kept


def test_unknown_split_lists_the_available_ones(ultrachat_dir):
    with pytest.raises(DataError, match=r"split 'train_sft' not found .*available splits: .*test_gen.*train_gen|"
                                        r"split 'train_sft' not found .*available splits: .*train_gen.*test_gen"):
        load_conversations(str(ultrachat_dir), "train_sft")


def test_missing_local_path_is_named(tmp_path):
    with pytest.raises(DataError, match="data set not found"):
        load_conversations(str(tmp_path / "nope"), "train")


def test_columns_without_chat_data_are_listed_with_accepted_formats(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    with pytest.raises(DataError, match=r"found \['answer', 'question'\].*Accepted formats: messages"):
        load_conversations(str(f), "train")


def test_messages_column_wins_over_ultrachat_prompt_column():
    assert detect_format(["prompt", "prompt_id", "messages"]) == "messages"
    assert detect_format(["prompt", "completion"]) == "prompt_completion"


@pytest.mark.parametrize("messages,reason", [
    ([], "empty conversation"),
    ([{"role": "user", "content": "hi"}], "no assistant reply at the end"),
    ([{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}], "unknown role 'robot'"),
    ([{"content": "hi"}, {"role": "assistant", "content": "x"}], "no role"),
    ([{"role": "user", "content": None}, {"role": "assistant", "content": "x"}], "null content"),
    ([{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}], "content is int"),
    ([{"role": "user", "content": " "}, {"role": "assistant", "content": "x"}], "empty content"),
    ([{"role": "assistant", "content": "x"}], "cannot come at the start"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}],
     "cannot come after a user message"),
])
def test_invalid_conversations_are_explained(messages, reason):
    assert reason in check_messages(messages)


def test_valid_conversation_with_system_and_tool_turns():
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"x": 1}}}
    assert check_messages([
        {"role": "system", "content": "s"}, {"role": "user", "content": "u"},
        {"role": "assistant", "content": "", "tool_calls": [call]}, {"role": "tool", "content": "{}",
                                                                      "tool_call_id": "c1"},
        {"role": "assistant", "content": "done"}]) is None
    # a result with no call before it is refused: the model would learn from a turn nobody asked for
    assert "follows no assistant tool call" in check_messages([
        {"role": "user", "content": "u"}, {"role": "assistant", "content": "{\"name\": \"f\"}"},
        {"role": "tool", "content": "{}"}, {"role": "assistant", "content": "done"}])


def test_invalid_rows_stop_with_row_numbers_or_are_skipped(tmp_path):
    f = tmp_path / "d.jsonl"
    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
            {"messages": [{"role": "user", "content": "q"}]},
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"1 invalid row\(s\) of 3(.|\n)*d.jsonl line 2: no assistant reply"):
        load_conversations(str(f), "train")
    loaded = load_conversations(str(f), "train", skip_invalid=True)
    assert len(loaded.dataset) == 2 and [r.where for r in loaded.rejected] == [f"{f} line 2"]


def test_holdout_split_is_deterministic_and_disjoint(ultrachat_dir):
    ds = load_conversations(str(ultrachat_dir), "train_gen").dataset
    ds = ds.select(list(range(len(ds))) + [0, 1])  # duplicated conversations
    train, held = holdout_split(ds, 0.2)
    train2, held2 = holdout_split(ds, 0.2)
    assert train["messages"] == train2["messages"] and held["messages"] == held2["messages"]
    as_key = lambda m: json.dumps(m, sort_keys=True)  # noqa: E731
    assert not {as_key(m) for m in train["messages"]} & {as_key(m) for m in held["messages"]}
    assert len(train) + len(held) == len(ds) and 0 < len(held) < len(ds)
