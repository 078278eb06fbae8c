"""What the data checks of issue 11 cost: the prepared-cache checksum and id check on every cache hit, and the
whole-file UTF-8 scan on every load of a local text file.

    python bench/integrity.py             # 50k conversations x 1024 tokens, a 1 GiB JSON Lines file
    python bench/integrity.py --quick     # 2k x 1024 and 32 MiB: checks the script itself

The cache entry is what `chattune train` saves for 50k conversations cut to 1024 tokens (int32 input_ids and
labels, half the labels -100), written with save_to_disk and sealed as prepared._save seals it. Timings are
with the files in the page cache (a second read); a cold read adds the disk's own time, the same for any hash.
Results go to bench/results/integrity.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def _best(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 23):
            h.update(chunk)
    return h.hexdigest()


def cache_entry(root: Path, rows: int, length: int, vocab: int) -> dict:
    import pyarrow as pa
    from datasets import Dataset, load_from_disk

    from chattune.data.integrity import check_rows, seal, verify

    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab, size=rows * length, dtype=np.int32)
    labels = np.where(rng.random(rows * length) < 0.5, ids, -100).astype(np.int32)
    offsets = pa.array(np.arange(0, rows * length + 1, length, dtype=np.int32))
    table = pa.table({"input_ids": pa.ListArray.from_arrays(offsets, pa.array(ids)),
                      "labels": pa.ListArray.from_arrays(offsets, pa.array(labels)),
                      "length": pa.array(np.full(rows, length, dtype=np.int32))})
    del ids, labels
    entry = root / "entry"
    Dataset(table).save_to_disk(str(entry / "train"))
    (entry / "meta.json").write_text(json.dumps({"train": {"rows": rows}}))
    size = sum(p.stat().st_size for p in entry.rglob("*") if p.is_file())
    seal_s = _best(lambda: seal(entry))
    verify_s = _best(lambda: verify(entry))
    assert verify(entry) is None
    arrows = [p for p in entry.rglob("*.arrow")]
    sha_s = _best(lambda: [_sha256(p) for p in arrows])
    ds = load_from_disk(str(entry / "train"))
    check_s = _best(lambda: check_rows(ds, vocab))
    assert check_rows(ds, vocab) is None
    load_s = _best(lambda: load_from_disk(str(entry / "train")))
    return {"rows": rows, "tokens_per_row": length, "entry_mb": round(size / 2**20, 1),
            "seal_s": round(seal_s, 3), "verify_xxh3_s": round(verify_s, 3), "verify_sha256_s": round(sha_s, 3),
            "check_ids_s": round(check_s, 3), "load_from_disk_s": round(load_s, 4),
            "hit_overhead_s": round(verify_s + check_s, 3)}


def utf8_scan(root: Path, mib: int) -> dict:
    from chattune.data.sources import first_invalid_utf8

    line = json.dumps({"messages": [{"role": "user", "content": "What is the capital of France? " * 8},
                                    {"role": "assistant", "content": "Paris, naturellement. Ça va ? 日本語も。" * 6}]},
                      ensure_ascii=False).encode() + b"\n"
    path = root / "big.jsonl"
    with open(path, "wb") as f:
        block = line * max(1, (8 << 20) // len(line))
        for _ in range(max(1, (mib << 20) // len(block))):
            f.write(block)
    size = path.stat().st_size
    scan_s = _best(lambda: first_invalid_utf8(path))
    assert first_invalid_utf8(path) is None
    read_s = _best(lambda: path.read_bytes() and None)
    return {"file_mb": round(size / 2**20, 1), "scan_s": round(scan_s, 3), "read_only_s": round(read_s, 3),
            "scan_mb_per_s": round(size / 2**20 / scan_s)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    rows, mib = (2000, 32) if args.quick else (50_000, 1024)
    with tempfile.TemporaryDirectory(prefix="chattune-bench-") as tmp:
        result = {"cache_entry": cache_entry(Path(tmp), rows, 1024, 50257)}
    with tempfile.TemporaryDirectory(prefix="chattune-bench-") as tmp:
        result["utf8_scan"] = utf8_scan(Path(tmp), mib)
    print(json.dumps(result, indent=2))
    if not args.quick:
        (HERE / "results" / "integrity.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
