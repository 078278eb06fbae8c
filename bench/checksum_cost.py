"""What checkpoint checksums cost on a GPT-2 124M checkpoint (issue 11, case 4).

    python bench/checksum_cost.py            # writes bench/results/checksum.json

A randomly initialised GPT-2 124M (transformers' GPT2Config() defaults) is saved as a checkpoint-sized set
of files: model.safetensors (~500 MB, save_pretrained) and optimizer.pt (~1 GB, AdamW's two moments after
one step, torch.save). Then, each timed `--repeats` times (the median is reported):
- write_manifest: the manifest every checkpoint save writes (fsync, then size and XXH3-128 of every file),
  run right after the save, while the files are in the page cache, as in training; and the checksums alone
  (what they add: the size-only manifest before them flushed every file too);
- verify: what --resume adds (every checksum again, plus the load probe of the small files);
- the same files hashed with blake2b and sha256, for comparison (why XXH3).
The save itself is timed too, so the cost can be read as a share of it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def build_checkpoint(d: Path) -> float:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (1, 16))
    model(ids, labels=ids).loss.backward()
    opt.step()
    start = time.perf_counter()
    model.save_pretrained(d)
    torch.save(opt.state_dict(), d / "optimizer.pt")
    return time.perf_counter() - start


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def hash_files(d: Path, make) -> None:
    for p in sorted(d.iterdir()):
        if p.is_file():
            with open(p, "rb") as f:
                hashlib.file_digest(f, make) if hasattr(hashlib, "file_digest") else make(f.read())


def main() -> None:
    from chattune.model.manifest import HASH, describe
    from chattune.training.checkpoints import problem, write_manifest

    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(HERE / "results" / "checksum.json"))
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="chattune-checksum-"))
    try:
        d = root / "checkpoint-1"
        d.mkdir()
        save_s = build_checkpoint(d)
        size = sum(p.stat().st_size for p in d.iterdir() if p.is_file())
        manifest_s = timed(lambda: write_manifest(d, 1), args.repeats)
        hash_s = timed(lambda: describe(d, sync=False), args.repeats)
        verify_s = timed(lambda: problem(d), args.repeats)
        assert problem(d) is None
        others = {name: timed(lambda m=make: hash_files(d, m), args.repeats)
                  for name, make in (("blake2b", hashlib.blake2b), ("sha256", hashlib.sha256))}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result = {
        "what": "GPT-2 124M checkpoint (GPT2Config() defaults, random init): model.safetensors + optimizer.pt",
        "bytes": size, "hash": HASH, "repeats": args.repeats,
        "save_seconds": round(save_s, 2),
        "write_manifest_seconds": round(manifest_s, 2), "write_manifest_MB_per_s": round(size / manifest_s / 1e6),
        # the part checksums add: the size-only manifest before them flushed (fsync) every file too
        "checksums_only_seconds": round(hash_s, 2), "checksums_MB_per_s": round(size / hash_s / 1e6),
        "verify_on_resume_seconds": round(verify_s, 2), "verify_MB_per_s": round(size / verify_s / 1e6),
        "other_hashes_seconds": {k: round(v, 2) for k, v in others.items()},
        "host": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (shared machine: noisy)",
        "command": "python bench/checksum_cost.py",
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
