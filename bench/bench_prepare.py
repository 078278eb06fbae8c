"""Data preparation at ultrachat scale: chattune against the tutorial's `map`-based preparation.

    python bench/bench_prepare.py            # 250k generated conversations (builds them once, ~5 min)
    python bench/bench_prepare.py --quick    # 5k conversations and a small tokenizer: a smoke test

Each measurement runs in a fresh process pinned to --cores cores, after one untimed load that fills
datasets' Arrow cache, so every timed run starts from the same warm `load_dataset`:

- tutorial: its `prepare_datasets` per-row map (`role: content` lines over messages[:-1]), then its
  batched `tokenizer(..., truncation=True, max_length=128)` map, as written in the tutorial;
- chattune, first run: `prepare_training_data` as `chattune train` calls it (load, validate, render
  the chat template, tokenize with loss masks, save the prepared-data cache), with an empty cache;
- chattune, second run: the same call again, which finds the cache.

Both sides use the same generated GPT-2-sized byte-level BPE tokenizer (see ultrachat_like.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _pin(cores: int) -> None:
    if hasattr(os, "sched_setaffinity"):
        available = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, available[:cores])


def _load_as_tutorial(data_dir: str):
    import datasets

    return datasets.load_dataset(data_dir, split="train_gen")


def _load_as_chattune(data_dir: str):
    from chattune.data.sources import load_parts

    return load_parts(data_dir, "train_gen")[0].dataset


def run_tutorial(data_dir: str, tokenizer_dir: str, max_length: int) -> dict:
    """The tutorial's preparation, as written (../shared/seed/tutorial-zh.txt)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.pad_token = tokenizer.eos_token
    _load_as_tutorial(data_dir).cleanup_cache_files()  # a first run: no map results cached yet
    start = time.perf_counter()
    train_dataset = _load_as_tutorial(data_dir)

    def prepare_datasets(data):
        prompt = ""
        for i in range(len(data['messages']) - 1):
            if len(prompt) > 0:
                prompt = prompt + "\n" + f"""{data['messages'][i]['role']}: {data['messages'][i]['content']}"""
            else:
                prompt = f"""{data['messages'][i]['role']}: {data['messages'][i]['content']}"""
        data['query'] = prompt
        return data

    def tokenize_datasets(dataset):
        tokenized_dataset = dataset.map(
            lambda example: tokenizer(
                example['query'],
                truncation=True,
                max_length=max_length,
            ),
            batched=True,
            remove_columns=['query']
        )
        return tokenized_dataset

    train_dataset = train_dataset.map(prepare_datasets, remove_columns=['prompt', 'prompt_id', 'messages'])
    train_dataset = tokenize_datasets(train_dataset)
    return {"seconds": time.perf_counter() - start, "rows": len(train_dataset)}


def run_chattune(data_dir: str, tokenizer_dir: str, max_length: int, out: str, clean: bool) -> dict:
    import datasets  # noqa: F401  (imports are outside the timing, as for the tutorial)
    from transformers import AutoTokenizer

    import chattune.data.mixture  # noqa: F401
    import chattune.data.tokenize  # noqa: F401
    from chattune.config import Config, validate
    from chattune.data.prepared import prepare_training_data
    from chattune.data.template import prepare_tokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    prepare_tokenizer(tokenizer)
    if clean:
        _load_as_chattune(data_dir).cleanup_cache_files()
    cfg = Config()
    cfg.data.dataset, cfg.data.train_split = data_dir, "train_gen"
    validate(cfg)
    Path(out).mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    data = prepare_training_data(cfg, tokenizer, max_length, Path(out))
    seconds = time.perf_counter() - start
    s = data.train_stats
    return {"seconds": seconds, "rows": s.rows_out, "from_cache": data.from_cache, "stats": vars(s)}


def _child(args) -> None:
    _pin(args.cores)
    if args.child == "tutorial":
        r = run_tutorial(args.data, args.tokenizer, args.max_length)
    elif args.child == "warm":
        t = time.perf_counter()
        r = {"rows": len(_load_as_tutorial(args.data)) + len(_load_as_chattune(args.data)),
             "seconds": time.perf_counter() - t}
    else:
        r = run_chattune(args.data, args.tokenizer, args.max_length, args.out, clean=args.child == "first")
    print("RESULT " + json.dumps(r))


def _spawn(kind: str, meta: dict, args, env: dict) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--data", meta["data"], "--tokenizer", meta["tokenizer"],
           "--max-length", str(args.max_length), "--cores", str(args.cores), "--out", str(args.work / "out")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.exit(f"{kind} failed:\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][7:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=250_000, help="conversations to generate (default 250000)")
    p.add_argument("--quick", action="store_true", help="5000 conversations, a 2000-token tokenizer: a smoke test")
    p.add_argument("--max-length", type=int, default=128, help="the tutorial's 128 (default)")
    p.add_argument("--cores", type=int, default=2, help="pin every run to this many cores (default 2)")
    p.add_argument("--work", type=Path, default=Path.home() / ".cache" / "chattune" / "bench",
                   help="where the generated data, tokenizer and caches live")
    p.add_argument("--json", type=Path, help="where to write the results (default: bench/results/prepare-ROWS.json)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--tokenizer", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return _child(args)

    sys.path.insert(0, str(HERE))
    import ultrachat_like

    rows, vocab = (5000, 2000) if args.quick else (args.rows, ultrachat_like.GPT2_VOCAB)
    meta = ultrachat_like.build(args.work, rows, vocab_size=vocab)
    env = {**os.environ, "HF_DATASETS_CACHE": str(args.work / "hf-datasets"),
           "CHATTUNE_CACHE": str(args.work / "chattune-cache"), "RAYON_NUM_THREADS": str(args.cores),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    env.pop("TOKENIZERS_PARALLELISM", None)  # the library default (parallel), as the tutorial ran
    shutil.rmtree(args.work / "chattune-cache", ignore_errors=True)
    print(f"data: {meta['n']} conversations, median {meta['median_tokens']:.0f} / p95 {meta['p95_tokens']:.0f} "
          f"tokens; tokenizer vocabulary {vocab}; max length {args.max_length}; {args.cores} cores", flush=True)
    warm = _spawn("warm", meta, args, env)
    print(f"untimed warm-up (each side's load_dataset fills its Arrow cache): {warm['seconds']:.1f} s", flush=True)
    results = {"data": meta, "cores": args.cores, "max_length": args.max_length}
    for kind in ("tutorial", "first", "second"):
        r = _spawn(kind, meta, args, env)
        r["conversations_per_s"] = meta["n"] / r["seconds"]
        results[kind] = r
        print(f"{kind:>9}: {r['seconds']:8.2f} s  {r['conversations_per_s']:10.0f} conversations/s", flush=True)
    results["first_vs_tutorial"] = results["first"]["conversations_per_s"] / results["tutorial"]["conversations_per_s"]
    results["first_vs_second"] = results["first"]["seconds"] / results["second"]["seconds"]
    assert results["second"]["from_cache"] and not results["first"]["from_cache"]
    print(f"chattune first run: {results['first_vs_tutorial']:.1f}x the tutorial's throughput; cached second run "
          f"{results['first_vs_second']:.0f}x faster than the first")
    for key in ("tokenizer", "data"):  # the machine's paths mean nothing elsewhere
        meta[key] = Path(meta[key]).name
    target = args.json or HERE / "results" / f"prepare-{'quick' if args.quick else meta['n']}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(results, indent=2))
    print(f"results: {target}")


if __name__ == "__main__":
    main()
