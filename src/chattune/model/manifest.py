"""Completion records: which files a save wrote, each with its size and a content checksum.

A checkpoint (chattune-checkpoint.json) and the final model directory (chattune-model.json) each get one,
written last: a directory whose record is missing, or whose files do not match it, is incomplete or was
changed afterwards. The checksum is XXH3-128 (data.digest.file_digest, as for prepared-data cache entries):
it catches truncation and bit flips, not tampering, and hashes at memory speed, about 2.4 GB/s here (a
GPT-2 124M checkpoint, 1.5 GB, takes about 0.6 s: docs/training.md, bench/checksum_cost.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from chattune.data.digest import FILE_HASH as HASH
from chattune.data.digest import file_digest
from chattune.errors import ChattuneError
from chattune.outputs import CHECKPOINT_PREFIX, FINAL_STAGING, MODEL_MANIFEST

WEIGHT_SUFFIXES = (".safetensors", ".bin")  # a final model's files whose size and checksum are checked


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a directory; the rename is still atomic
        pass
    finally:
        os.close(fd)


def describe(directory: Path, names: list[str] | None = None, sync: bool = True) -> dict:
    """{relative name: {size, digest}} for `names` (default: every file under `directory`), each flushed
    to disk first; hashed right after the save wrote them, while they are still in the page cache."""
    directory = Path(directory)
    if names is None:
        names = sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())
    files = {}
    for name in names:
        path = directory / name
        if sync:
            fsync_path(path)
        files[name] = {"size": path.stat().st_size, "digest": file_digest(path)}
    return files


def write_record(path: Path, record: dict) -> Path:
    """Write a manifest atomically (temporary file, fsync, rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)
    return path


def read_record(path: Path) -> dict | None:
    try:
        record = json.loads(Path(path).read_text())
        return record if isinstance(record.get("files"), dict) else None
    except (OSError, ValueError, AttributeError):
        return None


def files_problem(directory: Path, record: dict, content: bool = True, weights_only: bool = False) -> str | None:
    """Why the files under `directory` do not match `record`, or None. A record from an older chattune
    holds sizes only ({name: size}); its files are checked by size. With weights_only, other files are
    only checked to be there (a chat template or config edited by hand on purpose is not damage)."""
    directory = Path(directory)
    if record.get("hash", HASH) != HASH:
        content = False  # a hash this chattune does not know: sizes only
    for name, entry in record["files"].items():
        size, digest = (entry, None) if isinstance(entry, int) else (entry.get("size"), entry.get("digest"))
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if weights_only and not name.endswith(WEIGHT_SUFFIXES):
            continue
        actual = path.stat().st_size
        if actual != size:
            return f"{name} has {actual} bytes where {size} were written (truncated or changed)"
        if content and digest and file_digest(path) != digest:
            return f"{name} fails its checksum (changed or corrupted after it was written)"
    return None


def _has_checkpoint(directory: Path) -> bool:
    return any(p.is_dir() and p.name.startswith(f"{CHECKPOINT_PREFIX}-") for p in directory.iterdir())


def model_problem(directory: Path, content: bool = False) -> str | None:
    """Why a chattune model directory is incomplete, or None. Directories without chattune's record (plain
    model directories, runs from before it existed) have nothing to check: None."""
    directory = Path(directory)
    record = read_record(directory / MODEL_MANIFEST)
    if record is not None:
        if record.get("complete") is False:  # written before the files were moved into place
            return "its final save did not finish"
        return files_problem(directory, record, content, weights_only=True)
    if (directory / MODEL_MANIFEST).exists():
        return f"its {MODEL_MANIFEST} is unreadable"
    if (directory / FINAL_STAGING).is_dir():
        return "its final save did not finish"
    return None


def check_complete(path, content: bool = False) -> None:
    """Refuse an incomplete chattune model directory with one line naming the fix. Every reader of model
    directories calls it (hub.check_model_source covers loading; push and export call it themselves);
    `content` also verifies checksums (reads every byte: for uploads and exports, not for each chat)."""
    directory = Path(str(path)).expanduser()
    if not directory.is_dir():
        return
    reason = model_problem(directory, content)
    if reason is None:
        return
    fix = ("rerun its training command with --resume to write the model again from its newest checkpoint"
           if _has_checkpoint(directory) else "it has no checkpoint to resume from, so train it again")
    raise ChattuneError(f"{directory} holds an incomplete model: {reason}. {fix[0].upper()}{fix[1:]}")
