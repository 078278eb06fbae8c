"""Checks that make a prepared-data cache entry safe to train on, and the clean-up of entries a killed run
left half-written.

An entry is sealed when it is written (a checksum per file, meta.json included) and verified before it is
read; its rows must hold token ids the tokenizer has and labels that are those ids or IGNORE_INDEX. An
entry failing either check is prepared again: cached rows are never trusted on their name alone.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import time
from pathlib import Path

import numpy as np

from chattune.data.digest import file_digest
from chattune.outputs import IGNORE_INDEX

CHECKSUM_FILE = "checksums.json"
STALE_AFTER_S = 6 * 3600  # a temporary folder this old is no live preparation (saving takes minutes)
_TEMP = re.compile(r"\.tmp-(\d+)-(.+)-[a-z0-9_]+")
_OLD_TEMP = re.compile(r"\.[0-9a-f]+-[A-Za-z0-9_]+")  # an older chattune's: .ENTRY-KEY-RANDOM


def _files(entry: Path) -> list[str]:
    return sorted(str(p.relative_to(entry)) for p in entry.rglob("*") if p.is_file() and p.name != CHECKSUM_FILE)


def seal(entry: Path) -> None:
    """Record the checksum of every file of the entry (written last, before the entry is renamed into place)."""
    sums = {name: file_digest(entry / name) for name in _files(entry)}
    (entry / CHECKSUM_FILE).write_text(json.dumps({"hash": "xxh3_128", "files": sums}, indent=1))


def verify(entry: Path) -> str | None:
    """None when every file of the entry has the checksum it was sealed with; else what differs."""
    try:
        sealed = json.loads((entry / CHECKSUM_FILE).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return "has no readable checksums (an older chattune wrote it, or it is damaged)"
    found = _files(entry)
    if set(found) != set(sealed):
        diff = sorted(set(found) ^ set(sealed))
        return f"failed its checksum (files added or missing: {', '.join(diff[:3])})"
    changed = [name for name in found if file_digest(entry / name) != sealed[name]]
    return f"failed its checksum ({', '.join(changed[:3])} changed)" if changed else None


def check_rows(rows, vocab_size: int) -> str | None:
    """None when every input id is a token of the tokenizer (0 <= id < vocab_size) and every label is its
    input id or IGNORE_INDEX; else the first problem. Runs on Arrow buffers, batch by batch, without copies."""
    table = rows.with_format("arrow")[:]
    for batch in table.to_batches():
        ids_col, labels_col = batch.column("input_ids"), batch.column("labels")
        ids = ids_col.flatten().to_numpy(zero_copy_only=False)
        labels = labels_col.flatten().to_numpy(zero_copy_only=False)
        if len(ids):
            lo, hi = int(ids.min()), int(ids.max())
            if hi >= vocab_size or lo < 0:
                return f"holds input id {hi if hi >= vocab_size else lo} outside the tokenizer's {vocab_size} ids"
        if not np.array_equal(ids_col.value_lengths().to_numpy(zero_copy_only=False),
                              labels_col.value_lengths().to_numpy(zero_copy_only=False)):
            return "holds rows whose labels and input ids differ in length"
        if not np.all((labels == ids) | (labels == IGNORE_INDEX)):
            return f"holds labels that are neither the input id nor {IGNORE_INDEX}"
    return None


def temp_prefix() -> str:
    """The name a preparation's temporary folder starts with: whose it is, so a later run can tell it is dead."""
    return f".tmp-{os.getpid()}-{socket.gethostname()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError, ValueError):
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def remove_stale(root: Path) -> list[Path]:
    """Delete the temporary folders of preparations that died while saving: this machine's whose process is
    gone, and any (another machine's, an older chattune's) untouched for STALE_AFTER_S. Returns them."""
    if not root.is_dir():
        return []
    removed, host, now = [], socket.gethostname(), time.time()
    for d in root.iterdir():
        if not ((_TEMP.fullmatch(d.name) or _OLD_TEMP.fullmatch(d.name)) and d.is_dir()):
            continue  # only chattune's own: the root may also hold .git, .venv ...
        m = _TEMP.fullmatch(d.name)
        try:
            old = now - d.stat().st_mtime > STALE_AFTER_S
        except FileNotFoundError:  # another run removed it first
            continue
        if old or (m and m[2] == host and not _alive(int(m[1]))):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed
