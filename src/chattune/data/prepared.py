"""Training-ready data, and its on-disk cache.

A run's data is loaded, validated and tokenized once; the result is saved under
$CHATTUNE_CACHE/prepared/KEY (default ~/.cache/chattune), where KEY is a hash of what decides the
rows: the data's identity (local files by path, size and modification time; hub splits by datasets'
fingerprint), the data settings (formats, columns, splits, sampling, seed), the tokenizer, the chat
template, the max length and chattune's preparation code. A second run with the same inputs
memory-maps the saved rows and starts training without reading or tokenizing the data again.

An entry is never trusted on its name alone (data/integrity.py): it is sealed with a checksum per file when
written and verified before use, its ids must fit the tokenizer, and one that fails is prepared again.
`--no-cache` (cfg.data.cache off) reads no cache at all, datasets' own included.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from chattune.data.digest import code_digest, tokenizer_digest
from chattune.data.integrity import check_rows, remove_stale, seal, temp_prefix, verify
from chattune.data.loading import LoadedSplit, canonical_features
from chattune.data.mixture import load_training_data, sources
from chattune.data.sources import fresh_reads, kind_of, load_parts, split_files
from chattune.data.tokenize import PrepStats, prepare_split
from chattune.errors import DataError
from chattune.outputs import REJECTED_FILE

log = logging.getLogger("chattune")
PREVIEW_ROWS = 64  # canonical conversations kept with the rows, for the run report's samples


def cache_root() -> Path:
    return Path(os.environ.get("CHATTUNE_CACHE") or Path.home() / ".cache" / "chattune") / "prepared"


@dataclass
class Prepared:
    train_split: object  # LoadedSplit (on a cache hit its dataset holds the first PREVIEW_ROWS only)
    eval_split: object | None
    train_rows: object
    train_stats: object
    eval_rows: object | None
    eval_stats: object | None
    from_cache: bool = False
    cache_dir: Path | None = None


def _source_identity(spec, split: str) -> list:
    if kind_of(spec.dataset) == "hub":
        return [p.dataset._fingerprint for p in load_parts(spec.dataset, split, spec.config_name, spec.revision)]
    return [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns]
            for p in split_files(spec.dataset, split, spec.config_name, spec.revision)]


def cache_key(cfg, tokenizer, max_length: int | None) -> str:
    d = cfg.data
    specs = sources(d)
    data = [[dataclasses.asdict(s), _source_identity(s, s.split),
             _source_identity(s, s.eval_split) if s.eval_split else None] for s in specs]
    settings = {k: getattr(d, k) for k in ("max_train_samples", "max_eval_samples", "eval_fraction", "skip_invalid",
                                             "strict_tools")}
    blob = json.dumps([data, settings, cfg.train.seed, tokenizer_digest(tokenizer), max_length, code_digest()],
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:40]


def write_rejected(output_dir: Path, *splits) -> int:
    """Every skipped row with where it was and why, one JSON object per line, in OUTPUT/rejected.jsonl."""
    rows = [(s.name, p) for s in splits if s is not None for p in s.rejected]
    path = Path(output_dir) / REJECTED_FILE
    if not rows:
        if path.exists():
            path.unlink()  # a rerun without problems must not show an older run's rejects
        return 0
    with open(path, "w") as f:
        for name, p in rows:
            f.write(json.dumps({"split": name, "where": p.where, "kind": p.reason.kind, "reason": str(p.reason),
                                "data": p.row}, ensure_ascii=False, default=str) + "\n")
    return len(rows)


def _log_splits(train_split, eval_split, n_train: int, n_eval: int | None) -> None:
    log.info(f"data: {train_split.name}, format {train_split.format}, {n_train} conversations"
             + (f"; eval {eval_split.name}, {n_eval}" if eval_split is not None else "; no evaluation split"))
    ignored = (train_split.info or {}).get("ignored_columns")
    if ignored:
        log.info(f"columns not used by the {train_split.format} format: {', '.join(ignored)}")
    undeclared = [n for s in (train_split, eval_split) if s is not None for n in (s.info or {}).get(
        "undeclared_tool_calls", [])]
    if undeclared:
        log.warning(f"{len(undeclared)} conversation(s) call a function their tools do not declare (first: "
                    f"{undeclared[0]}); --strict-tools rejects them")


def _load_cached(path: Path, out: Path, main: bool, vocab_size: int) -> Prepared | None:
    """The entry's rows when it verifies; None (after a log line saying why) when it must be prepared again."""
    from datasets import Dataset, load_from_disk

    problem = verify(path)
    if problem is None:
        try:
            meta = json.loads((path / "meta.json").read_text())
            rows = {key: load_from_disk(str(path / key)) for key in ("train", "eval") if meta.get(key) is not None}
        except Exception as e:  # an entry that verifies but cannot be read is rebuilt, never trusted
            problem = f"cannot be read ({type(e).__name__}: {e})"
        else:
            problem = next((p for p in (check_rows(r, vocab_size) for r in rows.values()) if p), None)
    if problem is not None:
        log.warning(f"the cached prepared data {path} {problem}; preparing the data again")
        if main:
            shutil.rmtree(path, ignore_errors=True)
        return None

    def split(key):
        m = meta.get(key)
        if m is None:
            return None, None, None
        shown = m["preview"]  # (not `rows`: that is the cached splits, returned below)
        preview = Dataset.from_list(shown, features=canonical_features(
            "text" if m["format"] == "text" else "messages", tools="tools" in shown[0])) if shown else None
        loaded = LoadedSplit(dataset=preview, format=m["format"], name=m["name"], rejected=[])
        return loaded, rows[key], PrepStats(**m["stats"])

    train_split, train_rows, train_stats = split("train")
    eval_split, eval_rows, eval_stats = split("eval")
    _log_splits(train_split, eval_split, meta["train"]["rows"], meta["eval"]["rows"] if meta.get("eval") else None)
    rejected = path / REJECTED_FILE
    if main and rejected.exists():
        shutil.copyfile(rejected, out / REJECTED_FILE)
        log.info(f"skipped {meta['rejected']} invalid row(s); each is in {out / REJECTED_FILE} with its reason")
    elif main and (out / REJECTED_FILE).exists():
        (out / REJECTED_FILE).unlink()
    log.info(f"prepared data loaded from cache ({path})")
    return Prepared(train_split, eval_split, train_rows, train_stats, eval_rows, eval_stats, True, path)


def _save(path: Path, prepared: Prepared, out: Path, n_rejected: int) -> None:
    """Write the entry in a temporary directory and rename it into place, so a crash or a second run
    racing this one never leaves a half-written entry under the key."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(), dir=path.parent))  # named by pid: a later run removes it
    try:
        meta = {"created": time.time(), "rejected": n_rejected}
        for key, loaded, rows, stats in (("train", prepared.train_split, prepared.train_rows, prepared.train_stats),
                                         ("eval", prepared.eval_split, prepared.eval_rows, prepared.eval_stats)):
            if loaded is None or rows is None:
                meta[key] = None
                continue
            rows.save_to_disk(str(tmp / key))
            ds = loaded.dataset
            meta[key] = {"name": loaded.name, "format": loaded.format, "rows": len(ds), "stats": vars(stats),
                         "preview": ds.select(range(min(PREVIEW_ROWS, len(ds)))).to_list()}
        if (out / REJECTED_FILE).exists():
            shutil.copyfile(out / REJECTED_FILE, tmp / REJECTED_FILE)
        (tmp / "meta.json").write_text(json.dumps(meta, ensure_ascii=False, default=str))
        seal(tmp)
        os.rename(tmp, path)
    except OSError as e:
        log.warning(f"the prepared data could not be cached ({e}); the next run prepares it again")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def prepare_training_data(cfg, tokenizer, max_length: int | None, out: Path, main: bool = True) -> Prepared:
    """Rows to train and evaluate on: from the cache when an earlier run prepared the same, else
    loaded, validated (problems stop here, before any model weights are read) and tokenized.
    Only the main process (`main`) writes OUTPUT/rejected.jsonl and the cache entry."""
    path = None
    if cfg.data.cache:
        key = cache_key(cfg, tokenizer, max_length)
        path = cache_root() / key
        if main:
            for stale in remove_stale(cache_root()):
                log.info(f"removed {stale}, left by a preparation that did not finish")
        if path.is_dir():
            # ids run up to the tokenizer's size; max() covers tokenizers whose added ids leave gaps
            vocab_size = max(len(tokenizer), max(tokenizer.get_vocab().values(), default=-1) + 1)
            cached = _load_cached(path, out, main, vocab_size)
            if cached is not None:
                return cached
    with contextlib.nullcontext() if cfg.data.cache else fresh_reads():
        return _prepare(cfg, tokenizer, max_length, out, main, path)


def _prepare(cfg, tokenizer, max_length: int | None, out: Path, main: bool, path: Path | None) -> Prepared:
    train_split, eval_split = load_training_data(cfg)
    _log_splits(train_split, eval_split, len(train_split.dataset), len(eval_split.dataset) if eval_split else None)
    n_rejected = write_rejected(out, train_split, eval_split) if main else 0
    if n_rejected:
        log.info(f"skipped {n_rejected} invalid row(s); each is in {out / REJECTED_FILE} with its reason")
    kind = "text" if train_split.format == "text" else "messages"
    started = time.perf_counter()
    train_rows, train_stats = prepare_split(train_split.dataset, tokenizer, max_length, kind)
    eval_rows, eval_stats = None, None
    if eval_split is not None:
        eval_rows, eval_stats = prepare_split(eval_split.dataset, tokenizer, max_length, kind)
    log.info(f"tokenized in {time.perf_counter() - started:.1f} s")
    prepared = Prepared(train_split, eval_split, train_rows, train_stats, eval_rows, eval_stats)
    if train_stats.rows_out == 0:
        raise DataError(f"no training conversation keeps an assistant token within --max-length {max_length}; "
                        "raise --max-length")
    if path is not None and main:
        _save(path, prepared, out, n_rejected)
    return prepared
