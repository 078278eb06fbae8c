"""The parts of a source (one per file, or one hub split), and the reader for JSON files that Arrow cannot
read: parsed in Python entry by entry, so that each entry that is not JSON, not UTF-8 or nested past
Python's recursion limit becomes a row error naming its line, never a failed file or a crash."""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from chattune.data.validate import Reason
from chattune.errors import DataError


@dataclass
class Part:
    """One file (or one hub split) of a source, loaded by datasets (`dataset`) or, for a JSON file that
    Arrow cannot read, parsed in Python: `rows` in file order (None for an entry that is not an
    object), `where` each is, and `bad` {index: (Reason, raw text)} for the entries that failed."""

    label: str
    path: Path | None = None
    dataset: object = None
    rows: list | None = None
    where: list | None = None
    bad: dict = field(default_factory=dict)
    _lines: list | None = None

    @property
    def jsonl(self) -> bool:
        return self.path is not None and self.path.suffix.lower() == ".jsonl"

    def locate(self, i: int) -> str:
        """Where row i of this part is, for a person opening the file: 'FILE line N' or 'FILE row N'."""
        if self.where is not None:
            return f"{self.label} {self.where[i]}"
        if self.jsonl or (self.path is not None and self._is_json_lines()):
            if self._lines is None:  # rows are the non-blank lines, as Arrow's JSON reader counts them
                with open(self.path, encoding="utf-8", errors="replace") as f:
                    self._lines = [n for n, line in enumerate(f, 1) if line.strip()]
            if i < len(self._lines):
                return f"{self.label} line {self._lines[i]}"
        return f"{self.label} row {i}"

    def _is_json_lines(self) -> bool:
        if self.path.suffix.lower() != ".json":
            return False
        with open(self.path, "rb") as f:
            return not f.read(4096).lstrip().startswith(b"[")

    def raw(self, i: int):
        if self.rows is not None:
            return self.bad[i][1] if i in self.bad else self.rows[i]
        return self.dataset[i]


_DECODER = json.JSONDecoder()
_SPACE = re.compile(r"[ \t\n\r]*")
_BRACKET = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')  # a JSON string (skipped whole) or a bracket
_NOT_UTF8 = re.compile("[\udc80-\udcff]")  # where surrogateescape put the bytes that are not UTF-8
DEEP = Reason("nested too deeply", f"nested more than {sys.getrecursionlimit()} levels deep; a chat row needs a "
                                   "few levels")


def _not_utf8(text: str, first_line: int) -> Reason | None:
    """Where the first undecodable byte of an entry starting on line first_line is, as a row error."""
    m = _NOT_UTF8.search(text)
    if m is None:
        return None
    line = first_line + text.count("\n", 0, m.start())
    column = m.start() - text.rfind("\n", 0, m.start())
    return Reason("invalid UTF-8", f"not UTF-8 text (byte 0x{ord(m.group()) - 0xDC00:02X} at line {line}, column "
                                   f"{column}); save the file as UTF-8")


def _readable(text: str) -> str:
    """Text with its undecodable bytes shown as U+FFFD, for messages and rejected.jsonl."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def read_json_rows(path: Path) -> Part:
    """A JSON array or JSON Lines file read in Python, entry by entry: rows that parse, and for each one
    that does not (not JSON, not UTF-8, nested past Python's recursion limit), where and why."""
    text = path.read_bytes().decode("utf-8", "surrogateescape")
    part = Part(label=str(path), path=path, rows=[], where=[])
    if text.lstrip().startswith("["):
        for i, (item, start, end, reason) in enumerate(_array_items(text, path)):
            raw = _readable(text[start:end][:2000])
            if reason is None and _NOT_UTF8.search(text, start, end):  # rare: the line count is only paid then
                reason = _not_utf8(text[start:end], text.count("\n", 0, start) + 1)
            if reason is not None:
                part.bad[len(part.rows)] = (reason, raw)
                item = None
            _add(part, f"row {i}", item, raw)
        return part
    # split on newlines only: str.splitlines would also split on U+2028 inside JSON strings
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        item, reason = None, _not_utf8(line, n)
        if reason is None:
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                reason = Reason("invalid JSON", f"not valid JSON: {e.msg} (column {e.colno})")
            except RecursionError:
                reason = DEEP
        if reason is not None:
            part.bad[len(part.rows)] = (reason, _readable(line[:2000]))
        _add(part, f"line {n}", item, _readable(line[:2000]))
    return part


def _array_items(text: str, path: Path):
    """(value, start, end, None) for each entry of a JSON array, parsed one at a time so that an entry
    nested too deeply for Python's parser is skipped as (None, start, end, DEEP) instead of failing the file."""
    pos = _SPACE.match(text, text.index("[") + 1).end()
    if text.startswith("]", pos):
        return
    while True:
        try:
            item, end = _DECODER.raw_decode(text, pos)
            yield item, pos, end, None
        except RecursionError:
            end = _end_of_nested(text, pos, path)
            yield None, pos, end, DEEP
        except json.JSONDecodeError as e:
            raise _json_error(path, e) from None
        pos = _SPACE.match(text, end).end()
        if text.startswith(",", pos):
            pos = _SPACE.match(text, pos + 1).end()
        elif text.startswith("]", pos) and not text[pos + 1:].strip():
            return
        else:
            raise _json_error(path, json.JSONDecodeError("Expecting ',' delimiter or the array's end", text, pos))


def _end_of_nested(text: str, pos: int, path: Path) -> int:
    """Where the array or object starting at pos ends, by counting brackets outside strings (Python's
    parser gives up on it; this loop needs no recursion)."""
    depth = 0
    for m in _BRACKET.finditer(text, pos):
        token = m.group()
        if token in "[{":
            depth += 1
        elif token in "]}":
            depth -= 1
            if depth == 0:
                return m.end()
    raise _json_error(path, json.JSONDecodeError("an array or object that never ends", text, pos))


def _json_error(path: Path, e: json.JSONDecodeError) -> DataError:
    return DataError(f"{path}: not valid JSON at line {e.lineno} column {e.colno}: {e.msg}. A .json file holds one "
                     "JSON array of objects (or use JSON Lines, one object per line)")


def _add(part: Part, where: str, item, raw: str) -> None:
    if not isinstance(item, dict) and len(part.rows) not in part.bad:
        part.bad[len(part.rows)] = (Reason("malformed row", f"a JSON {type(item).__name__}, expected an object "
                                                            "with the format's columns"), raw)
    part.rows.append(item if isinstance(item, dict) else None)
    part.where.append(where)
