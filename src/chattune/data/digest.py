"""Fingerprints that name cached data: one for chattune's data code, one for a tokenizer.

A cache entry (datasets' map cache, the prepared-data cache) is named by what decides its content, so
a changed converter, template or tokenizer never reuses rows an older one produced.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from importlib import resources


@lru_cache(maxsize=1)
def code_digest() -> str:
    """A hash of every source file of chattune.data (converters, checks, template, tokenization)."""
    h = hashlib.sha256()
    root = resources.files("chattune.data")
    for entry in sorted(root.iterdir(), key=lambda e: e.name):
        if entry.name.endswith((".py", ".jinja")):
            h.update(entry.name.encode())
            h.update(entry.read_bytes())
    return h.hexdigest()


def tokenizer_digest(tokenizer) -> str:
    """A hash of everything about a tokenizer that decides token ids: its full backend definition
    (vocabulary, merges, normalizer, added tokens), chat template and special tokens."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    h.update(definition.encode())
    h.update(json.dumps([tokenizer.chat_template, tokenizer.special_tokens_map], sort_keys=True, default=str).encode())
    return h.hexdigest()


FILE_HASH = "xxh3_128"  # file_digest's algorithm, recorded in manifests so that a later change can read older ones


def file_digest(path, block: int = 1 << 23) -> str:
    """xxh3-128 of a file's bytes, read 8 MiB at a time. It checks that cached rows are the bytes that were
    written, not that nobody forged them; xxhash comes with datasets and hashes at memory speed, where
    sha256 would add seconds per GB to every cache hit (bench/integrity.py measures both)."""
    import xxhash

    h = getattr(xxhash, FILE_HASH)()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()
