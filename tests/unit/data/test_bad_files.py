"""Files that used to crash the loader (issue 11, cases 7, 8 and 18): JSON nested past Python's recursion
limit, bytes that are not UTF-8 after the first 64 KiB, and CSV cells that look like numbers. Each gives a
row error naming its line, which --skip-invalid skips (and rejected.jsonl keeps), never a crash."""

from __future__ import annotations

import csv
import json

import pytest

from chattune.cli import main
from chattune.config import Config
from chattune.data import load_conversations
from chattune.data.prepared import prepare_training_data
from chattune.data.template import prepare_tokenizer
from chattune.errors import DataError

GOOD = {"messages": [{"role": "user", "content": "what is up " * 8}, {"role": "assistant", "content": "the sky"}]}
DEEP = '{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}"  # far past Python's recursion limit


def _validate(capsys, path) -> tuple[int, str]:
    code = main(["data", "validate", "--dataset", str(path)])
    captured = capsys.readouterr()
    assert "unexpected" not in captured.err and "Traceback" not in captured.err, captured.err
    return code, captured.out + captured.err


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_json_nested_too_deeply_is_a_row_error_that_skip_invalid_skips(tmp_path, capsys, suffix):
    path = tmp_path / f"deep{suffix}"
    good = json.dumps(GOOD)
    if suffix == ".jsonl":
        path.write_text(f"{good}\n{DEEP}\n{good}\n")
        where = f"{path} line 2"
    else:
        path.write_text(f"[{good},\n{DEEP},\n{good}]")
        where = f"{path} row 1"
    code, out = _validate(capsys, path)
    assert code == 2 and f"{where}: " in out and "nested too deeply" in out, out
    with pytest.raises(DataError, match="nested too deeply"):
        load_conversations(str(path), "train")
    loaded = load_conversations(str(path), "train", skip_invalid=True)
    assert len(loaded.dataset) == 2
    assert [(p.where, p.reason.kind) for p in loaded.rejected] == [(where, "nested too deeply")]


def test_a_csv_cell_holding_deep_json_is_a_row_error(tmp_path):
    path = tmp_path / "deep.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["messages"])
        w.writerow([json.dumps(GOOD["messages"])])
        w.writerow(["[" * 100_000 + "]" * 100_000])
    loaded = load_conversations(str(path), "train", skip_invalid=True)
    assert len(loaded.dataset) == 1 and [p.reason.kind for p in loaded.rejected] == ["nested too deeply"]


def _bad_utf8_after_64k(path, n_good: int = 700, bad_line: int = 650, array: bool = False) -> int:
    """A file over 64 KiB whose only undecodable bytes are on line `bad_line`; returns its size."""
    lines = [json.dumps(GOOD).encode()] * n_good
    lines[bad_line - 1] = lines[bad_line - 1].replace(b"the sky", b"the \xff\xfe sky")
    data = (b"[" + b",\n".join(lines) + b"]\n") if array else b"\n".join(lines) + b"\n"
    path.write_bytes(data)
    return len(data)


def test_invalid_utf8_past_64k_is_found_named_by_line_and_skipped(tmp_path, capsys, model_dir, tiny_tokenizer):
    path = tmp_path / "late.jsonl"
    assert _bad_utf8_after_64k(path) > 65536 + 10_000
    code, out = _validate(capsys, path)
    assert code == 2 and f"{path} line 650: " in out and "not UTF-8" in out, out
    loaded = load_conversations(str(path), "train", skip_invalid=True)
    assert len(loaded.dataset) == 699 and [p.where for p in loaded.rejected] == [f"{path} line 650"]
    # `train --skip-invalid` trains on the rest and keeps the line, readable, in rejected.jsonl
    cfg = Config()
    cfg.model.name, cfg.data.dataset, cfg.data.skip_invalid, cfg.data.cache = str(model_dir), str(path), True, False
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    prepare_tokenizer(tiny_tokenizer)
    prepared = prepare_training_data(cfg, tiny_tokenizer, 64, out_dir)
    assert prepared.train_stats.rows_in == 699
    rejected = [json.loads(x) for x in (out_dir / "rejected.jsonl").read_text().splitlines()]
    assert [(r["where"], r["kind"]) for r in rejected] == [(f"{path} line 650", "invalid UTF-8")]
    assert "the \ufffd\ufffd sky" in rejected[0]["data"]


def test_invalid_utf8_in_a_json_array_names_the_line_and_skips_the_row(tmp_path, capsys):
    path = tmp_path / "late.json"
    _bad_utf8_after_64k(path, array=True)
    code, out = _validate(capsys, path)
    assert code == 2 and "line 650" in out and "not UTF-8" in out, out
    loaded = load_conversations(str(path), "train", skip_invalid=True)
    assert len(loaded.dataset) == 699 and [p.where for p in loaded.rejected] == [f"{path} row 649"]


def test_invalid_utf8_in_a_csv_stops_with_its_line(tmp_path, capsys):
    path = tmp_path / "late.csv"
    rows = [b"instruction,output"] + [b"what is up,the sky is blue " + b"x" * 80] * 900
    rows[800] = b"what is up,the \xff sky"
    path.write_bytes(b"\n".join(rows) + b"\n")
    code, out = _validate(capsys, path)
    assert code == 2 and f"{path} line 801" in out and "not UTF-8" in out, out


def test_csv_cells_are_text_even_when_they_look_like_numbers(tmp_path):
    path = tmp_path / "sums.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["instruction", "output", "input"])
        for i in range(5):
            w.writerow([f"what is {i} + {i}", str(2 * i), "NA" if i == 0 else ""])
    loaded = load_conversations(str(path), "train")
    convs = loaded.dataset["messages"]
    assert [c[-1]["content"] for c in convs] == ["0", "2", "4", "6", "8"]
    assert convs[0][0]["content"] == "what is 0 + 0\nNA"  # a cell reading NA is text, not a missing value
    # JSON keeps its types, and its check
    (tmp_path / "sums.jsonl").write_text(json.dumps({"instruction": "what is 1 + 1", "output": 2}) + "\n")
    with pytest.raises(DataError, match="content is int"):
        load_conversations(str(tmp_path / "sums.jsonl"), "train")
