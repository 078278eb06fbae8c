"""The final model directory, written so that a kill or a full disk never leaves a half-written model
that looks whole.

The run directory also holds checkpoints, logs and metrics, so it cannot be swapped as one directory;
its model files are. Every file (weights, configs, tokenizer, template, adapter extras) is first written
into OUTPUT/.final-staging. Then OUTPUT/chattune-model.json is replaced by the new manifest marked
incomplete, each file is renamed into place, files of an earlier final model that the new one lacks are
removed, and the manifest is rewritten as complete, last. Until that last write the directory reads as
incomplete (model.manifest.check_complete), and chat, eval, serve, merge, push and export refuse it with one line
naming the fix; an earlier complete model stays complete until the renames begin.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from chattune.errors import ChattuneError
from chattune.model.manifest import HASH, describe, fsync_path, read_record, write_record
from chattune.outputs import FINAL_STAGING, MODEL_MANIFEST
from chattune.training.checkpoints import newest_complete
from chattune.training.distributed import any_rank

log = logging.getLogger("chattune")


def _clear(staging: Path) -> None:
    """Empty the staging directory without removing it: while it exists, an unfinished save is visible."""
    staging.mkdir(parents=True, exist_ok=True)
    for entry in staging.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def place(staging: Path, out: Path) -> list[str]:
    """Move the staged model files into `out`, the manifest last; the names placed."""
    names = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file())
    files = describe(staging, names)
    earlier = read_record(out / MODEL_MANIFEST) or {"files": {}}
    write_record(out / MODEL_MANIFEST, {"hash": HASH, "complete": False, "files": files})
    for name in names:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / name, out / name)
    for name in set(earlier["files"]) - set(names):  # an earlier model's file the new one lacks (a stale shard)
        (out / name).unlink(missing_ok=True)
    fsync_path(out)
    write_record(out / MODEL_MANIFEST, {"hash": HASH, "complete": True, "files": files})
    shutil.rmtree(staging, ignore_errors=True)
    return names


def _cause(error: BaseException | None) -> str:
    if error is None:
        return "the save failed on another process"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror + (f" ({error.filename})" if error.filename else "")
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text}"


def resume_advice(out: Path, problem: str = "free disk space or fix the permissions") -> str:
    """What to do after a failed write: --resume only when there is a checkpoint to continue from."""
    found, _ = newest_complete(out, content=False)
    if found is not None:
        return f"{problem}, then rerun the same command with --resume: it continues from {found.name} and writes the " \
               "model again"
    return f"{problem}, then run the training again (no checkpoint had been saved to resume from)"


def save_final(trainer, out: Path, write_extras) -> None:
    """Write the final model into `out` atomically. Every process calls it (FSDP and ZeRO-3 gather the
    weights for rank 0); `write_extras(directory)` adds rank 0's files (tokenizer, adapter extras)."""
    out = Path(out)
    staging = out / FINAL_STAGING
    main = trainer.is_world_process_zero()
    error = None
    try:
        if main:
            _clear(staging)
    except OSError as e:
        error = e
    trainer.accelerator.wait_for_everyone()
    if not any_rank([error is not None], trainer.args.device)[0]:
        try:
            trainer.save_model(str(staging))
            if main:
                write_extras(staging)
        except Exception as e:  # disk full surfaces as OSError, RuntimeError (torch.save) or SafetensorError
            error = e
    if not any_rank([error is not None], trainer.args.device)[0] and main:
        try:
            place(staging, out)
        except OSError as e:
            error = e
    if error is not None:
        raise ChattuneError(f"could not write the final model to {out}: {_cause(error)}. Training itself finished; "
                            f"{resume_advice(out)}") from error
