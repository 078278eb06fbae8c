"""Broken data stops with the file, the line or row, what is wrong and how to fix it; --skip-invalid
trains on the rest and keeps every rejected row with its reason."""

from __future__ import annotations

import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from chattune.cli import main
from chattune.data import load_conversations
from chattune.data.validate import ROLES, check_messages, suspect_rows
from chattune.errors import DataError

GOOD = {"messages": [{"role": "user", "content": "what is up"}, {"role": "assistant", "content": "the sky is blue"}]}


def jsonl(path, rows, blank_after_first=False):
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    if blank_after_first:
        lines.insert(1, "")
    path.write_text("\n".join(lines) + "\n")
    return path


def msgs(*pairs):
    return {"messages": [dict(zip(("role", "content"), p)) if isinstance(p, tuple) else p for p in pairs]}


# (file name, rows, what the message must say); the bad row is the second row, on line 3 (a blank line 2)
BROKEN_ROWS = [
    ("invalid_json.jsonl", [GOOD, '{"messages": [{"role": "user", "content": "hi"}'], "invalid JSON"),
    ("empty_messages.jsonl", [GOOD, {"messages": []}], "empty conversation"),
    ("missing_role.jsonl", [GOOD, msgs({"content": "hi"}, ("assistant", "x"))], "message 0 has no role"),
    ("unknown_role.jsonl", [GOOD, msgs(("robot", "hi"), ("assistant", "x"))], "unknown role 'robot'"),
    ("no_reply.jsonl", [GOOD, msgs(("user", "hi"))], "no assistant reply at the end"),
    ("null_content.jsonl", [GOOD, msgs(("user", None), ("assistant", "x"))], "null content"),
    ("number_content.jsonl", [GOOD, msgs(("user", 3), ("assistant", "x"))], "content is int, expected a string"),
]


@pytest.mark.parametrize("name,rows,expected", BROKEN_ROWS, ids=[b[0] for b in BROKEN_ROWS])
def test_each_broken_row_is_named_by_file_and_line(tmp_path, capsys, name, rows, expected):
    path = jsonl(tmp_path / name, rows, blank_after_first=True)
    code = main(["data", "validate", "--dataset", str(path)])
    out = capsys.readouterr().out
    assert code == 2
    assert f"{path} line 3: " in out and expected in out, out
    assert "1 invalid row(s) of 2" in out and "(fix: " in out and "--skip-invalid" in out


def _truncated_parquet(path):
    pq.write_table(pa.Table.from_pylist([GOOD] * 50), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


BROKEN_FILES = [
    ("wrong_columns.jsonl", lambda p: p.write_text('{"question": "q", "answer": "a"}\n'),
     "no usable chat columns: found ['answer', 'question']"),
    ("empty.jsonl", lambda p: p.write_text(""), "the file is empty"),
    ("binary.jsonl", lambda p: p.write_bytes(bytes(range(256)) * 4), "binary data (a NUL byte at offset 0)"),
    ("truncated.parquet", _truncated_parquet, "truncated parquet file"),
    ("not_parquet.parquet", lambda p: p.write_text("hello"), "not a parquet file"),
    ("broken_array.json", lambda p: p.write_text('[{"messages": []},\n {"messages": [}]'), "not valid JSON at line 2"),
]


@pytest.mark.parametrize("name,write,expected", BROKEN_FILES, ids=[b[0] for b in BROKEN_FILES])
def test_each_broken_file_stops_with_the_file_named(tmp_path, capsys, name, write, expected):
    path = tmp_path / name
    write(path)
    code = main(["data", "validate", "--dataset", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    line = next(x for x in err.splitlines() if x.startswith("error:"))
    assert line.startswith(f"error: {path}") and expected in line, err


def test_rows_of_parquet_and_json_arrays_are_named_by_index(tmp_path):
    rows = [GOOD, GOOD, msgs(("user", "hi"), ("user", "again"), ("assistant", "x"))]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    with pytest.raises(DataError, match=r"d.parquet row 2: message 1: role 'user' cannot come after a user message"):
        load_conversations(str(tmp_path / "d.parquet"), "train")
    (tmp_path / "d.json").write_text(json.dumps(rows))
    with pytest.raises(DataError, match=r"d.json row 2: .*role order|d.json row 2: message 1"):
        load_conversations(str(tmp_path / "d.json"), "train")


def test_report_counts_problems_by_kind_and_shows_the_first_few(tmp_path):
    rows = [GOOD] + [msgs(("user", "q"))] * 7 + [msgs(("robot", "q"), ("assistant", "a"))] * 2
    with pytest.raises(DataError) as err:
        load_conversations(str(jsonl(tmp_path / "d.jsonl", rows)), "train")
    text = str(err.value)
    assert text.splitlines()[0].endswith("9 invalid row(s) of 10")
    assert "  no assistant reply: 7 (fix: " in text and "  unknown role: 2 (fix: " in text
    assert text.count(" line ") == 5 and "... and 4 more" in text


def test_zero_usable_rows_is_an_error_even_when_skipping(tmp_path):
    path = jsonl(tmp_path / "d.jsonl", [msgs(("user", "q"))] * 3)
    with pytest.raises(DataError, match="No row is usable"):
        load_conversations(str(path), "train", skip_invalid=True)


def test_skip_invalid_trains_on_valid_rows_and_writes_every_rejected_row(tmp_path, model_dir):
    bad = [r for _, rs, _ in BROKEN_ROWS for r in rs[1:]]
    path = jsonl(tmp_path / "mixed.jsonl", [GOOD] * 6 + bad + [GOOD] * 2)
    out = tmp_path / "out"
    args = ["train", "--model", str(model_dir), "--dataset", str(path), "--output-dir", str(out), "--max-steps", "1",
            "--batch-size", "2", "--no-eval-baseline"]
    assert main(args) == 2  # without --skip-invalid: stops, nothing trained
    assert not (out / "model.safetensors").exists()
    assert main(args + ["--skip-invalid"]) == 0
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    assert [r["where"] for r in rejected] == [f"{path} line {n}" for n in range(7, 7 + len(bad))]
    assert [r["kind"] for r in rejected] == ["invalid JSON", "empty conversation", "missing role", "unknown role",
                                             "no assistant reply", "null content", "non-string content"]
    assert all(r["reason"] and r["data"] for r in rejected)
    log = (out / "train.log").read_text()
    assert "8 conversations" in log and f"skipped {len(bad)} invalid row(s)" in log


def test_blank_python_whitespace_is_what_arrow_treats_as_blank():
    import pyarrow.compute as pc

    from chattune.data.validate import _BLANK

    every = [chr(c) for c in range(0x3001) if not 0xD800 <= c < 0xE000]
    blank = pc.match_substring_regex(pa.array(every), _BLANK).to_pylist()
    assert [c for c, b in zip(every, blank) if b] == [c for c in every if c.isspace()]


def test_arrow_checks_flag_every_row_the_python_rule_rejects():
    rng = random.Random(0)
    pool = list(ROLES) + ["robot"]
    convs = []
    for _ in range(3000):
        n = rng.choice([0, 1, 2, 2, 3, 4, 5])
        convs.append([{"role": rng.choice(pool) if rng.random() < 0.3 else ("user", "assistant")[i % 2],
                       "content": rng.choice(["hi", "", " \n", "\u3000", "ok"]) if rng.random() < 0.2 else "text"}
                      for i in range(n)])
    column = pa.chunked_array([pa.array(convs[:1000]), pa.array(convs[1000:])])
    flagged = set(suspect_rows(column).tolist())
    rejected = {i for i, c in enumerate(convs) if check_messages(c)}
    assert flagged == rejected and 0 < len(rejected) < len(convs)
    assert isinstance(suspect_rows(column), np.ndarray)
