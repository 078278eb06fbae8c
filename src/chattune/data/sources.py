"""Where data comes from: a hub data set, a local directory laid out like one, or local files (one,
several separated by commas, or a glob).

Loading goes through `datasets`; this module decides what to ask it for, checks that each file is
what its name says before it is read (a text file must be UTF-8 from its first byte to its last), and
turns failures into messages that name the file and, for rows, the line (JSON Lines) or row index
(JSON arrays, parquet, CSV, hub splits).
"""

from __future__ import annotations

import codecs
import contextlib
import glob
import logging
import os
import re
from pathlib import Path

from chattune.data.parts import Part, read_json_rows
from chattune.errors import DataError

FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
_FRESH = {"on": False}  # inside fresh_reads(): local files are read again, not taken from datasets' cache
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")
_GLOB = re.compile(r"[*?\[]")


@contextlib.contextmanager
def fresh_reads():
    """What `--no-cache` promises: within, datasets reuses none of its caches. Local files are converted to
    Arrow again (its cache knows a file by path and modification time only, so a same-size edit made within
    the same second would be missed) and every map is computed again (datasets' caching switched off)."""
    import datasets

    was_caching, was_fresh = datasets.is_caching_enabled(), _FRESH["on"]
    datasets.disable_caching()
    _FRESH["on"] = True
    try:
        yield
    finally:
        _FRESH["on"] = was_fresh
        if was_caching:
            datasets.enable_caching()


def _first_line(err: Exception) -> str:
    text = str(err)
    return text.splitlines()[0] if text.strip() else type(err).__name__


def kind_of(source: str) -> str:
    """'file', 'files' (a comma-separated list or a glob), 'dir' or 'hub' (an owner/name id)."""
    p = Path(source).expanduser()
    if p.is_file():
        return "file"
    if p.is_dir():
        return "dir"
    if "," in source or _GLOB.search(source):
        return "files"
    looks_local = source.startswith((".", "/", "~")) or source.count("/") > 1 or p.suffix.lower() in FILE_BUILDERS
    if looks_local or not _HUB_ID.match(source):
        raise DataError(f"data set not found: {source} is neither a local file or directory nor a hub id "
                        "(owner/name). Check the path.")
    return "hub"


def resolve_files(source: str) -> list[Path]:
    """The files a file source names, in a stable order; each must exist and be of a known type."""
    files: list[Path] = []
    for entry in [s.strip() for s in source.split(",") if s.strip()] if not Path(source).exists() else [source]:
        if _GLOB.search(entry) and not Path(entry).exists():
            matches = sorted(Path(m) for m in glob.glob(os.path.expanduser(entry), recursive=True)
                             if Path(m).is_file())
            if not matches:
                raise DataError(f"no file matches {entry}")
            files += matches
        else:
            p = Path(entry).expanduser()
            if not p.is_file():
                raise DataError(f"data file not found: {entry}")
            files.append(p)
    for p in files:
        if p.suffix.lower() not in FILE_BUILDERS:
            raise DataError(f"{p}: unsupported file type '{p.suffix}'; use .json, .jsonl, .parquet or .csv")
    return files


def check_file(path: Path) -> None:
    """Stop early, naming the file, when it is empty, binary where text is expected, or a parquet file
    without its footer (truncated) or metadata."""
    size = path.stat().st_size
    if size == 0:
        raise DataError(f"{path}: the file is empty")
    with open(path, "rb") as f:
        head = f.read(65536)
        if path.suffix.lower() == ".parquet":
            f.seek(max(0, size - 4))
            tail = f.read(4)
    if path.suffix.lower() == ".parquet":
        if head[:4] != b"PAR1":
            raise DataError(f"{path}: not a parquet file (it does not start with the PAR1 marker)")
        if size < 12 or tail != b"PAR1":
            raise DataError(f"{path}: truncated parquet file (the PAR1 footer is missing); copy or export it again")
        import pyarrow.parquet as pq

        try:
            pq.ParquetFile(path)
        except Exception as e:
            raise DataError(f"{path}: the parquet metadata cannot be read ({_first_line(e)}); the file is "
                            "damaged") from e
        return
    if head.startswith(b"\x1f\x8b"):
        raise DataError(f"{path}: this is gzip-compressed data, not text; decompress it first")
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DataError(f"{path}: the file is UTF-16 encoded; save it as UTF-8")
    nul = head.find(b"\x00")
    if nul >= 0:
        raise DataError(f"{path}: binary data (a NUL byte at offset {nul}), not a {path.suffix} text file")
    if not head.strip() and size <= len(head):
        raise DataError(f"{path}: the file holds only whitespace")


UTF8_BLOCK = 1 << 24  # 16 MiB read at a time: the whole file is checked in bounded memory


def first_invalid_utf8(path: Path) -> tuple[int, int] | None:
    """(line, byte offset) of the first bytes of a text file that are not UTF-8, or None. Arrow's JSON
    reader does not check the encoding, so a bad byte past the first block used to surface mid-training;
    the whole file is checked here block by block, by Arrow's UTF-8 validator (about 1 GB/s here, five
    times Python's decoder, and no text is built); only a block that fails is decoded to find the byte."""
    import pyarrow as pa

    base, carry = 0, b""
    with open(path, "rb") as f:
        while True:
            block = f.read(UTF8_BLOCK)
            data = carry + block
            cut = _whole_characters(data) if block else len(data)
            try:
                pa.Array.from_buffers(pa.string(), 1, [None, pa.py_buffer(_span(cut)), pa.py_buffer(data)]) \
                    .validate(full=True)
            except pa.ArrowInvalid:
                try:
                    codecs.utf_8_decode(data[:cut], "strict", True)
                except UnicodeDecodeError as e:
                    return _line_at(path, base + e.start), base + e.start
            if not block:
                return None
            base += cut
            carry = data[cut:]


def _whole_characters(data: bytes) -> int:
    """How many leading bytes of a block hold whole characters: a character cut by the block's end waits
    for the next block."""
    for k in range(len(data) - 1, max(len(data) - 4, -1), -1):
        lead = data[k]
        if lead & 0xC0 != 0x80:  # ASCII or the first byte of a character
            need = 1 if lead < 0x80 else 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
            return len(data) if k + need <= len(data) else k
    return len(data)


def _span(n: int) -> bytes:
    return (0).to_bytes(4, "little") + n.to_bytes(4, "little")  # Arrow offsets: one string of n bytes


def _line_at(path: Path, offset: int) -> int:
    with open(path, "rb") as f:
        return 1 + sum(block.count(b"\n") for block in iter(lambda: f.read(min(UTF8_BLOCK, offset - f.tell())), b""))


def _load_file(path: Path, builder: str) -> Part:
    import datasets

    check_file(path)
    bad = None if builder == "parquet" else first_invalid_utf8(path)
    if bad is not None:
        if builder != "json":
            raise DataError(f"{path} line {bad[0]}: not UTF-8 text (invalid byte at offset {bad[1]}); save the file "
                            "as UTF-8 (a CSV row that cannot be decoded cannot be skipped)")
        return _json_rows(path)  # Arrow would read the bad bytes into strings: each entry is checked in Python
    ds_log = datasets.utils.logging.get_logger("datasets")
    level = ds_log.level
    if builder == "json":  # its reader logs the Arrow error before raising; the diagnosis below says more
        ds_log.setLevel(max(level, logging.CRITICAL))
    try:
        ds = datasets.load_dataset(builder, data_files={"train": [str(path)]}, split="train",
                                   download_mode="reuse_cache_if_exists" if _FRESH["on"] else None,
                                   **(_csv_as_text(path) if builder == "csv" else {}))
        return Part(label=str(path), path=path, dataset=ds)
    except Exception as e:  # datasets raises many types; a JSON file is diagnosed line by line below
        if builder != "json":
            raise DataError(f"{path}: could not be read as {builder} ({_first_line(e)})") from e
    finally:
        ds_log.setLevel(level)
    return _json_rows(path)


def _json_rows(path: Path) -> Part:
    part = read_json_rows(path)
    if not part.rows:
        raise DataError(f"{path}: no JSON objects in the file")
    return part


def _csv_as_text(path: Path) -> dict:
    """load_dataset arguments that keep every CSV cell as the text it is: pandas would read a column of
    numbers as int (then rejected as 'content is int') and the word NA as a missing value."""
    import pandas as pd
    from datasets import Features, Value

    try:
        names = pd.read_csv(path, nrows=0).columns  # the header as pandas names it (duplicates renamed)
    except Exception as e:  # pandas raises many types for a malformed header
        raise DataError(f"{path}: could not be read as csv ({_first_line(e)})") from e
    return {"features": Features({str(n): Value("string") for n in names}), "keep_default_na": False}


def _hub_failure(source: str, err: Exception) -> DataError:
    text = str(err)
    if any(s in text for s in ("offline", "Connection", "resolve", "Max retries", "Network", "connect")) \
            or os.environ.get("HF_HUB_OFFLINE") == "1":
        return DataError(f"could not load data set '{source}' from the Hugging Face hub (no network, and not in the "
                         f"local cache): {_first_line(err)}. Give a local directory or file with --dataset, or run "
                         "once with network to fill the cache.")
    if "doesn't exist" in text or "not found" in text.lower() or "404" in text:
        return DataError(f"data set '{source}' was not found on the hub; check the name (and that you are logged in "
                         "for private or gated sets)")
    return DataError(f"could not load data set '{source}': {_first_line(err)}")


def _builder(source: str, kind: str, config_name: str | None, revision: str | None):
    import datasets

    try:
        return datasets.load_dataset_builder(str(Path(source).expanduser()) if kind == "dir" else source,
                                             name=config_name, revision=revision)
    except Exception as e:  # datasets raises many types here; all mean the source is unusable
        if kind == "hub":
            raise _hub_failure(source, e) from e
        raise DataError(f"{source}: not a data set directory datasets can read ({_first_line(e)})") from e


def list_splits(source: str, config_name: str | None = None, revision: str | None = None) -> list[str]:
    """The split names a source offers. Local files are one split, 'train'."""
    kind = kind_of(source)
    if kind in ("file", "files"):
        return ["train"]
    builder = _builder(source, kind, config_name, revision)
    if builder.info.splits:
        return list(builder.info.splits)
    return list(getattr(builder.config, "data_files", None) or {})


def split_files(source: str, split: str, config_name: str | None = None, revision: str | None = None) -> list[Path]:
    """The local files a split of a file or directory source is read from (used to fingerprint it)."""
    kind = kind_of(source)
    if kind in ("file", "files"):
        if split != "train":
            raise DataError(f"{source} is one or more local files, so its only split is 'train' (asked for "
                            f"'{split}'); use --eval-fraction to hold out evaluation rows")
        return resolve_files(source)
    if kind == "dir":
        # the split's own files, read with explicit data_files: datasets caches a directory by its name and
        # README alone, so two directories called 'data' (or an edited one) would share a stale cache
        builder = _builder(source, kind, config_name, revision)
        files = dict(getattr(builder.config, "data_files", None) or {})
        if split not in files:
            raise DataError(f"split '{split}' not found in {source}; available splits: {', '.join(files) or 'none'}")
        paths = [Path(f) for f in files[split]]
        for p in paths:
            if p.suffix.lower() not in FILE_BUILDERS:
                raise DataError(f"{p}: unsupported file type '{p.suffix}' in {source}; use .json, .jsonl, .parquet "
                                "or .csv")
        return paths
    return []


def load_parts(source: str, split: str, config_name: str | None = None, revision: str | None = None) -> list[Part]:
    """A split as parts, one per file (so problems name their file), or one for a hub split."""
    import datasets

    if kind_of(source) != "hub":
        return [_load_file(p, FILE_BUILDERS[p.suffix.lower()]) for p in split_files(source, split, config_name,
                                                                                      revision)]
    available = list_splits(source, config_name, revision)
    if split not in available:
        raise DataError(f"split '{split}' not found in {source}; available splits: {', '.join(available) or 'none'}")
    try:
        ds = datasets.load_dataset(source, name=config_name, split=split, revision=revision)
    except Exception as e:
        raise _hub_failure(source, e) from e
    return [Part(label=f"{source} [{split}]", dataset=ds)]
