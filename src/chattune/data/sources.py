"""Where data comes from: a hub data set, a local directory laid out like one, or a local file.

Loading goes through `datasets`; this module only decides what to ask it for and turns its
failures into messages that say what to do.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from chattune.errors import DataError

FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


def kind_of(source: str) -> str:
    """'file', 'dir' or 'hub' (a name that is no local path and looks like owner/name)."""
    p = Path(source).expanduser()
    if p.is_file():
        return "file"
    if p.is_dir():
        return "dir"
    looks_local = source.startswith((".", "/", "~")) or source.count("/") > 1 or p.suffix.lower() in FILE_BUILDERS
    if looks_local or not _HUB_ID.match(source):
        raise DataError(f"data set not found: {source} is neither a local file or directory nor a hub id "
                        "(owner/name). Check the path.")
    return "hub"


def _hub_failure(source: str, err: Exception) -> DataError:
    text = str(err)
    if any(s in text for s in ("offline", "Connection", "resolve", "Max retries", "Network", "connect")) \
            or os.environ.get("HF_HUB_OFFLINE") == "1":
        return DataError(f"could not load data set '{source}' from the Hugging Face hub (no network, and not in the "
                         f"local cache): {text.splitlines()[0] if text else type(err).__name__}. Give a local "
                         "directory or file with --dataset, or run once with network to fill the cache.")
    if "doesn't exist" in text or "not found" in text.lower() or "404" in text:
        return DataError(f"data set '{source}' was not found on the hub; check the name (and that you are logged in "
                         "for private or gated sets)")
    return DataError(f"could not load data set '{source}': {text.splitlines()[0] if text else type(err).__name__}")


def _builder(source: str, kind: str, config_name: str | None, revision: str | None):
    import datasets

    try:
        return datasets.load_dataset_builder(str(Path(source).expanduser()) if kind == "dir" else source,
                                             name=config_name, revision=revision)
    except Exception as e:  # datasets raises many types here; all mean the source is unusable
        if kind == "hub":
            raise _hub_failure(source, e) from e
        raise DataError(f"{source}: not a data set directory datasets can read ({str(e).splitlines()[0]})") from e


def list_splits(source: str, config_name: str | None = None, revision: str | None = None) -> list[str]:
    """The split names a source offers. A single file is one split, 'train'."""
    kind = kind_of(source)
    if kind == "file":
        return ["train"]
    builder = _builder(source, kind, config_name, revision)
    if builder.info.splits:
        return list(builder.info.splits)
    return list(getattr(builder.config, "data_files", None) or {})


def _load_files(builder_name: str, files: list[str], split: str, where: str):
    import datasets

    try:
        return datasets.load_dataset(builder_name, data_files={split: files}, split=split)
    except Exception as e:
        raise DataError(f"{where}: could not be read as {builder_name} ({str(e).splitlines()[0]})") from e


def load_split(source: str, split: str, config_name: str | None = None, revision: str | None = None):
    """Load one split as a `datasets.Dataset`; unknown splits name the ones available."""
    import datasets

    kind = kind_of(source)
    if kind == "file":
        path = Path(source).expanduser()
        builder = FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise DataError(f"{path}: unsupported file type '{path.suffix}'; use .json, .jsonl, .parquet or .csv")
        if split != "train":
            raise DataError(f"{path} is a single file, so its only split is 'train' (asked for '{split}'); "
                            "use --eval-fraction to hold out evaluation rows")
        if path.stat().st_size == 0:
            raise DataError(f"{path}: the file is empty")
        return _load_files(builder, [str(path)], "train", str(path))
    if kind == "dir":
        # Load the split's own files with explicit data_files: datasets caches a directory by its name and
        # README alone, so two directories called 'data' (or an edited one) would share a stale cache.
        builder = _builder(source, kind, config_name, revision)
        files = dict(getattr(builder.config, "data_files", None) or {})
        if split not in files:
            raise DataError(f"split '{split}' not found in {source}; available splits: {', '.join(files) or 'none'}")
        return _load_files(builder.name, list(files[split]), split, f"{source} [{split}]")
    available = list_splits(source, config_name, revision)
    if split not in available:
        raise DataError(f"split '{split}' not found in {source}; available splits: {', '.join(available) or 'none'}")
    try:
        return datasets.load_dataset(source, name=config_name, split=split, revision=revision)
    except Exception as e:
        raise _hub_failure(source, e) from e
