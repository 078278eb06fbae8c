"""The prepared-data cache is never trusted blindly (issue 11, case 5): an entry whose files changed fails its
checksum and is prepared again; ids outside the vocabulary are never loaded; --no-cache reads no cache at all
(datasets' own included); a preparation killed while saving leaves no folder behind for long."""

from __future__ import annotations

import json
import os
import shutil
import socket
import time

import numpy as np

from chattune.config import Config, validate
from chattune.data import prepared as prepared_mod
from chattune.data.prepared import cache_key, cache_root, prepare_training_data
from chattune.data.template import prepare_tokenizer


def _rows(n: int, word: str = "blue") -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"what is {i} + {i}"},
                          {"role": "assistant", "content": f"the sky is {word} {i}"}]} for i in range(n)]


def _setup(tmp_path, model_dir, tokenizer, name: str = "d.jsonl"):
    data = tmp_path / name
    data.write_text("".join(json.dumps(r) + "\n" for r in _rows(24)))
    prepare_tokenizer(tokenizer)
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    cfg = Config()
    cfg.model.name, cfg.data.dataset, cfg.train.output_dir = str(model_dir), str(data), str(out)
    return validate(cfg), data, out


def _edit_first_id(entry, rows, new_id: int) -> None:
    """Overwrite the first input id of the first row in the entry's Arrow file, keeping its size."""
    ids = rows["input_ids"][0]
    arrow = next((entry / "train").glob("*.arrow"))
    blob = arrow.read_bytes()
    needle = np.asarray(ids[:6], dtype="<i4").tobytes()
    at = blob.index(needle)
    arrow.write_bytes(blob[:at] + np.int32(new_id).tobytes() + blob[at + 4:])


def test_an_entry_whose_rows_changed_fails_its_checksum_and_is_prepared_again(tmp_path, model_dir, tiny_tokenizer,
                                                                               caplog):
    cfg, _, out = _setup(tmp_path, model_dir, tiny_tokenizer)
    first = prepare_training_data(cfg, tiny_tokenizer, 64, out)
    entry = cache_root() / cache_key(cfg, tiny_tokenizer, 64)
    assert prepare_training_data(cfg, tiny_tokenizer, 64, out).from_cache
    old = first.train_rows["input_ids"][0][0]
    _edit_first_id(entry, first.train_rows, old + 1 if old + 1 < len(tiny_tokenizer) else old - 1)  # still valid
    with caplog.at_level("INFO", logger="chattune"):
        again = prepare_training_data(cfg, tiny_tokenizer, 64, out)
    assert not again.from_cache and "failed its checksum" in caplog.text
    assert again.train_rows["input_ids"] == first.train_rows["input_ids"]
    assert prepare_training_data(cfg, tiny_tokenizer, 64, out).from_cache  # the rebuilt entry is trusted again


def test_ids_outside_the_vocabulary_are_never_loaded(tmp_path, model_dir, tiny_tokenizer, caplog):
    cfg, _, out = _setup(tmp_path, model_dir, tiny_tokenizer)
    first = prepare_training_data(cfg, tiny_tokenizer, 64, out)
    entry = cache_root() / cache_key(cfg, tiny_tokenizer, 64)
    _edit_first_id(entry, first.train_rows, len(tiny_tokenizer) + 7)
    prepared_mod.seal(entry)  # as if the entry had been written with the bad id: its checksum matches
    with caplog.at_level("INFO", logger="chattune"):
        again = prepare_training_data(cfg, tiny_tokenizer, 64, out)
    assert not again.from_cache and f"input id {len(tiny_tokenizer) + 7}" in caplog.text
    assert again.train_rows["input_ids"] == first.train_rows["input_ids"]


def test_no_cache_reads_no_cache_at_all(tmp_path, model_dir, tiny_tokenizer):
    cfg, data, out = _setup(tmp_path, model_dir, tiny_tokenizer)
    prepare_training_data(cfg, tiny_tokenizer, 64, out)  # fills every cache: datasets' and chattune's
    stat = data.stat()
    data.write_text("".join(json.dumps(r) + "\n" for r in _rows(24, word="gray")))  # same size, new words
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the same modification time
    assert data.stat().st_size == stat.st_size
    cfg.data.cache = False
    fresh = prepare_training_data(cfg, tiny_tokenizer, 64, out)
    assert not fresh.from_cache
    assert "gray" in fresh.train_split.dataset[0]["messages"][1]["content"]
    assert "gray" in tiny_tokenizer.decode(fresh.train_rows["input_ids"][0])


def test_folders_of_killed_preparations_are_removed(tmp_path, model_dir, tiny_tokenizer):
    cfg, _, out = _setup(tmp_path, model_dir, tiny_tokenizer)
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    dead = root / f".tmp-999999999-{socket.gethostname()}-abc"  # a process of this machine that is gone
    old = root / ".0123abcd-xyz"  # left by an older chattune, days ago
    live = root / f".tmp-{os.getpid()}-{socket.gethostname()}-def"  # a preparation still running
    for d in (dead, old, live):
        (d / "train").mkdir(parents=True)
    past = time.time() - 3 * 86400
    os.utime(old, (past, past))
    prepare_training_data(cfg, tiny_tokenizer, 64, out)
    assert not dead.exists() and not old.exists() and live.exists()
    assert not [p for p in root.iterdir() if p.name.startswith(".") and p != live]
    shutil.rmtree(live)
