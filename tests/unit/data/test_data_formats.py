"""Every source shape and location becomes the same canonical conversations, and trains to the same
tokens: messages, sharegpt and alpaca files; globs, lists and mixes of files; tool turns."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import Dataset

from chattune.config import Config, validate
from chattune.data import load_conversations
from chattune.data.loading import canonical_features
from chattune.data.mixture import load_training_data
from chattune.data.prepared import prepare_training_data
from chattune.data.template import prepare_tokenizer
from chattune.data.tokenize import prepare_split
from chattune.data.tools import to_arrow
from chattune.errors import ChattuneError, ConfigError

from conftest import SHARED_DATA

SYSTEMS = [None, "be brief", None, "you are kind", None, None, "be brief", None, None, "what is up"]


def ten_conversations() -> list[dict]:
    """Ten conversations alpaca can express too: optional system, history turns, an instruction with
    an optional input (alpaca joins them with one newline, as LLaMA-Factory does), and the final output."""
    rows = []
    for i in range(10):
        history = [[f"what is {i} + {j}", f"{i} + {j} = {i + j}."] for j in range(i % 3)]
        instruction, extra = f"hi there {i}", ("the sky is blue" if i % 4 == 0 else "")
        rows.append({"system": SYSTEMS[i], "history": history, "instruction": instruction, "input": extra,
                     "output": f"hello {i}, you are kind"})
    return rows


def as_messages(r: dict) -> list[dict]:
    msgs = [{"role": "system", "content": r["system"]}] if r["system"] else []
    for q, a in r["history"]:
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    user = r["instruction"] + (f"\n{r['input']}" if r["input"] else "")
    return msgs + [{"role": "user", "content": user}, {"role": "assistant", "content": r["output"]}]


def as_sharegpt(r: dict) -> dict:
    names = {"user": "human", "assistant": "gpt", "system": "system"}
    return {"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in as_messages(r)]}


@pytest.fixture()
def three_files(tmp_path):
    rows = ten_conversations()
    files = {"messages": tmp_path / "chat.jsonl", "sharegpt": tmp_path / "chat_sharegpt.json",
             "alpaca": tmp_path / "chat_alpaca.json"}
    files["messages"].write_text("".join(json.dumps({"messages": as_messages(r)}) + "\n" for r in rows))
    files["sharegpt"].write_text(json.dumps([as_sharegpt(r) for r in rows], indent=1))
    files["alpaca"].write_text(json.dumps([{k: v for k, v in r.items() if v is not None} for r in rows], indent=1))
    return files


def _cfg(dataset: str, model_dir, tmp_path, **data) -> Config:
    cfg = Config()
    cfg.model.name, cfg.data.dataset, cfg.train.output_dir = str(model_dir), dataset, str(tmp_path / "out")
    for k, v in data.items():
        setattr(cfg.data, k, v)
    return validate(cfg)


def test_same_conversations_in_three_formats_train_to_identical_tokens(three_files, model_dir, tiny_tokenizer,
                                                                       tmp_path):
    prepare_tokenizer(tiny_tokenizer)
    prepared = {}
    for fmt, path in three_files.items():
        (tmp_path / "out").mkdir(exist_ok=True)
        data = prepare_training_data(_cfg(str(path), model_dir, tmp_path), tiny_tokenizer, 256, tmp_path / "out")
        assert data.train_split.format == fmt
        prepared[fmt] = (data.train_rows["input_ids"], data.train_rows["labels"])
    assert len(prepared["messages"][0]) == 10
    assert prepared["messages"] == prepared["sharegpt"] == prepared["alpaca"]
    # system prompts and history turns made it through: row 1 has a system prompt and one history pair
    text = tiny_tokenizer.decode(prepared["alpaca"][0][1])
    assert "be brief" in text and "1 + 0 = 1." in text


def test_alpaca_joins_instruction_and_input_with_one_newline_as_llama_factory_does():
    from chattune.data.formats import from_alpaca

    def user(row):
        return from_alpaca({"output": "o", **row}, {})[-2]["content"]

    assert user({"instruction": "Translate to French", "input": "good morning"}) == "Translate to French\ngood morning"
    assert user({"instruction": "Say hi", "input": ""}) == "Say hi"
    assert user({"instruction": "Say hi"}) == "Say hi"
    assert user({"instruction": "", "input": "good morning"}) == "good morning"  # empty parts are skipped, not joined


def test_forced_format_and_renamed_columns(tmp_path):
    f = tmp_path / "dialog.jsonl"
    f.write_text(json.dumps({"dialog": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                             "question": "q"}) + "\n")
    loaded = load_conversations(str(f), "train", fmt="messages", columns={"messages": "dialog"})
    assert loaded.dataset[0]["messages"][1] == {"role": "assistant", "content": "a"}
    with pytest.raises(ChattuneError, match=r"format alpaca needs column\(s\) \['instruction', 'output'\]"):
        load_conversations(str(f), "train", fmt="alpaca")


def test_prompt_completion_and_text_formats(tmp_path, tiny_tokenizer):
    pc = tmp_path / "pc.csv"
    pc.write_text("prompt,completion\nhi there,hello\nwhat is up,the sky is blue\n")
    loaded = load_conversations(str(pc), "train")
    assert loaded.format == "prompt_completion"
    assert loaded.dataset[1]["messages"] == [{"role": "user", "content": "what is up"},
                                             {"role": "assistant", "content": "the sky is blue"}]
    txt = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": ["the sky is blue", "you are kind"]}), txt)
    loaded = load_conversations(str(txt), "train")
    assert loaded.format == "text"
    prepare_tokenizer(tiny_tokenizer)
    rows, stats = prepare_split(loaded.dataset, tiny_tokenizer, 64, "text")
    ids = rows["input_ids"][0]
    assert rows["labels"][0] == ids and ids[-1] == tiny_tokenizer.eos_token_id  # loss on every token, eos ends it


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not present")
def test_real_alpaca_and_sharegpt_files_with_tool_turns():
    alpaca = load_conversations(str(SHARED_DATA / "alpaca_en_demo.json"), "train")
    assert alpaca.format == "alpaca" and len(alpaca.dataset) == 999
    raw = json.loads((SHARED_DATA / "alpaca_en_demo.json").read_text())
    i = next(i for i, r in enumerate(raw) if r.get("input"))
    assert alpaca.dataset[i]["messages"][-2]["content"] == raw[i]["instruction"] + "\n" + raw[i]["input"]
    glaive = load_conversations(str(SHARED_DATA / "glaive_toolcall_en_demo.json"), "train")
    assert glaive.format == "sharegpt" and len(glaive.dataset) == 300
    assert "tools" not in glaive.info.get("ignored_columns", [])  # its tool definitions are kept
    roles = [[m["role"] for m in conv] for conv in glaive.dataset["messages"]]
    first_tool = next(r for r in roles if "tool" in r)
    i = first_tool.index("tool")
    assert first_tool[i - 1] == "assistant" and first_tool[i + 1] == "assistant"  # call, result, answer


@pytest.mark.parametrize("template,what", [
    ("{% for m in messages %}{% if m['role'] not in ['user', 'assistant', 'system'] %}{{ raise_exception('roles "
     "must alternate') }}{% endif %}{{ m['role'] + ': ' + m['content'] + eos_token }}{% endfor %}",
     "rendering one fails"),
    ("{% for m in messages %}{% if m['role'] in ['user', 'assistant'] %}{{ m['role'] + ': ' + m['content'] + eos_token "
     "}}{% endif %}{% endfor %}", "drops the content"),
])
def test_model_template_that_cannot_express_tool_turns_is_refused(tiny_tokenizer, template, what):
    tiny_tokenizer.chat_template = template
    prepare_tokenizer(tiny_tokenizer)
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": {}}}
    convs = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
             [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": [call]},
              {"role": "tool", "content": "42"}, {"role": "assistant", "content": "done"}]]
    pairs = [to_arrow(c, None) for c in convs]
    data = Dataset.from_dict({"messages": [m for m, _ in pairs], "tools": [None, None]},
                             features=canonical_features("messages", tools=True))
    with pytest.raises(ChattuneError, match=what) as err:
        prepare_split(data, tiny_tokenizer, None)
    assert "'tool' turns such as conversation 1, message 2" in str(err.value)


def test_globs_lists_and_directories_of_files(tmp_path, ultrachat_dir):
    for i in range(3):
        rows = [{"messages": [{"role": "user", "content": f"q{i}{j}"}, {"role": "assistant", "content": "a"}]}
                for j in range(2)]
        (tmp_path / f"part-{i}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    by_glob = load_conversations(str(tmp_path / "part-*.jsonl"), "train")
    assert [m[0]["content"] for m in by_glob.dataset["messages"]] == ["q00", "q01", "q10", "q11", "q20", "q21"]
    listed = load_conversations(f"{tmp_path / 'part-2.jsonl'},{tmp_path / 'part-0.jsonl'}", "train")
    assert [m[0]["content"] for m in listed.dataset["messages"]] == ["q20", "q21", "q00", "q01"]
    with pytest.raises(ChattuneError, match="no file matches"):
        load_conversations(str(tmp_path / "nothing-*.jsonl"), "train")
    # a hub-layout directory: its README's split names, each read from its own files
    assert len(load_conversations(str(ultrachat_dir), "test_gen").dataset) == 16


def test_mixture_with_counts_and_fractions_is_deterministic(tmp_path, three_files, ultrachat_dir, model_dir):
    cfg = _cfg(None, model_dir, tmp_path, datasets=[
        {"dataset": str(ultrachat_dir), "split": "train_gen", "samples": 20},
        {"dataset": str(three_files["sharegpt"]), "fraction": 0.5},
    ])
    train, evaluation = load_training_data(cfg)
    again, _ = load_training_data(cfg)
    assert len(train.dataset) == 25 and evaluation is None
    assert train.format == "messages+sharegpt"
    assert train.dataset["messages"] == again.dataset["messages"]
    # the ultrachat layout's prompt and prompt_id columns are named for the log, through the mix too
    assert {"prompt", "prompt_id"} <= set(train.info["ignored_columns"])
    cfg.train.seed = 7
    other, _ = load_training_data(cfg)
    assert other.dataset["messages"] != train.dataset["messages"]
    cfg.data.eval_fraction = 0.2
    train, held = load_training_data(cfg)
    assert len(train.dataset) + len(held.dataset) == 25 and len(held.dataset) > 0


def test_mixture_settings_are_checked_with_the_field_named(model_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"data.datasets\[0\]: give samples or fraction, not both"):
        _cfg(None, model_dir, tmp_path, datasets=[{"dataset": "x.jsonl", "samples": 3, "fraction": 0.5}])
    with pytest.raises(ConfigError, match=r"data.datasets\[1\].fraction must be a number in \(0, 1\]"):
        _cfg(None, model_dir, tmp_path, datasets=[{"dataset": "a.jsonl"}, {"dataset": "b.jsonl", "fraction": 2}])
    with pytest.raises(ConfigError, match=r"unknown setting 'sample' \(did you mean 'samples'\?\)"):
        _cfg(None, model_dir, tmp_path, datasets=[{"dataset": "a.jsonl", "sample": 3}])
    with pytest.raises(ConfigError, match="not both"):
        _cfg("a.jsonl", model_dir, tmp_path, datasets=[{"dataset": "b.jsonl"}])
