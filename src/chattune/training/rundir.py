"""The run directory: what may be written where, the checkpoint a run continues from, its log file, and
one metrics curve after a resume.

What `--output-dir` may hold when a run starts (check_output_dir):
- nothing, or only the run's own inputs (a base model or data set kept inside it, as the quickstart does),
  or only the bookkeeping of an earlier attempt that left no checkpoint and no model (its train.log is kept
  and appended to): the run starts;
- checkpoints: the run continues with --resume, and is refused without it;
- anything else (a finished run whose checkpoints were deleted, unrelated files): refused unless --overwrite,
  which moves every entry except the run's inputs to a new sibling OUTPUT.replaced-YYYYmmdd-HHMMSS: nothing
  is deleted.
Never the base model's own directory or a directory inside it, nor a base model kept where checkpoint
rotation or the final save would remove it.

Pure Python (no torch or transformers): `chattune train` runs these checks before its heavy imports.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from chattune.errors import ChattuneError
from chattune.outputs import (
    CHECKPOINT_STAGING,
    CONFIG_FILE,
    FINAL_STAGING,
    LOCK_FILE,
    LOG_FILE,
    MERGED_DIR,
    METRICS_FILE,
    MODEL_MANIFEST,
    QUICKSTART_MARKER,
    REJECTED_FILE,
    REPLACED_SUFFIX,
    TENSORBOARD_DIR,
)
from chattune.training.checkpoints import CheckpointError, check_resume_target, checkpoint_dirs, newest_complete

log = logging.getLogger("chattune")

# what an attempt that ended before its first checkpoint leaves: a new run may start over it (TensorBoard's
# runs/ gets one more subfolder)
BOOKKEEPING = {CONFIG_FILE, LOG_FILE, METRICS_FILE, REJECTED_FILE, CHECKPOINT_STAGING, FINAL_STAGING, LOCK_FILE,
               TENSORBOARD_DIR}


def _resolved(path) -> Path:
    return Path(str(path)).expanduser().resolve()


def _local_inputs(cfg) -> list[Path]:
    """The run's base model and data files that are paths on this machine, resolved."""
    names = [cfg.model.name, cfg.model.chat_template]
    for spec in [cfg.data.dataset or "", *(e.dataset for e in cfg.data.datasets)]:
        for part in str(spec).split(","):
            names.append(part.strip().split("*")[0].split("?")[0])  # a glob's fixed prefix
    return [_resolved(n) for n in names if n and Path(str(n)).expanduser().exists()]


def _inside(path: Path, parent: Path) -> bool:
    return path == parent or parent in path.parents


def _check_base_model(cfg, out: Path) -> Path | None:
    """Refuse an output directory that would write over the base model; the model's path when it is a
    local directory."""
    if not Path(str(cfg.model.name)).expanduser().exists():
        return None
    model = _resolved(cfg.model.name)
    if _inside(out, model):
        where = "the base model's own directory" if out == model else "inside the base model's directory"
        raise ChattuneError(f"--output-dir {out} is {where} (--model {model}): training would write over the model "
                            "it starts from; choose another --output-dir")
    if _inside(model, out):
        rel = model.relative_to(out).parts[0]
        if rel.startswith("checkpoint-") or rel in (CHECKPOINT_STAGING, FINAL_STAGING, MERGED_DIR):
            raise ChattuneError(f"the base model {model} lies in {out / rel}, which this run replaces or removes "
                                "(checkpoint rotation, the final save): copy it elsewhere, or choose another "
                                "--output-dir")
    return model


def check_output_dir(cfg) -> list[Path]:
    """Refuse an output directory the run must not write into (one line, naming the fix); the entries
    that --overwrite would move aside (empty when there is nothing to move)."""
    t = cfg.train
    if t.resume not in (False, None) and t.overwrite:
        raise ChattuneError("give --resume or --overwrite, not both: --resume continues the run in --output-dir, "
                            "--overwrite moves it aside and starts afresh")
    out = _resolved(t.output_dir)
    if out.exists() and not out.is_dir():
        raise ChattuneError(f"--output-dir {out} is a file, not a directory")
    if out == Path(out.anchor) or _inside(Path.home().resolve(), out):
        raise ChattuneError(f"--output-dir {out} is the root or your home directory (or above it); give a directory "
                            "of its own")
    _check_base_model(cfg, out)
    if not out.is_dir():
        return []
    inputs = {p.relative_to(out).parts[0] for p in _local_inputs(cfg) if p != out and _inside(p, out)}
    entries = sorted(p for p in out.iterdir() if p.name not in inputs | {LOCK_FILE, QUICKSTART_MARKER})
    names = {p.name for p in entries}
    # runs/ is a common name: it is a failed attempt's only when that attempt's own files are there too
    if not entries or (names <= BOOKKEEPING and (TENSORBOARD_DIR not in names or names - {TENSORBOARD_DIR})):
        return []
    if t.resume not in (False, None):
        return []  # resolve_resume finds the checkpoint, or says there is none
    if not t.overwrite:
        raise ChattuneError(_refusal(out, entries, bool(checkpoint_dirs(out))))
    return entries  # the run's inputs are not among them: --overwrite never moves the base model or the data


def _refusal(out: Path, entries: list[Path], has_checkpoints: bool) -> str:
    fix = (f"pass --overwrite to move its contents to {out.name}{REPLACED_SUFFIX}DATE-TIME and start afresh, or "
           "choose another --output-dir")
    if has_checkpoints:
        return f"{out} already holds checkpoints of an earlier run: pass --resume to continue it, {fix}"
    names = {p.name for p in entries}
    if names & {CONFIG_FILE, MODEL_MANIFEST, "config.json", "adapter_config.json"}:
        return f"{out} holds a finished run (a model, no checkpoint to resume from): {fix}"
    shown = ", ".join(p.name for p in entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
    return f"{out} is not empty and not a chattune run (it holds {shown}): {fix}"


def set_aside(out: Path, entries: list[Path]) -> Path | None:
    """Move `entries` of `out` into a new sibling OUTPUT.replaced-YYYYmmdd-HHMMSS (renames: nothing is copied
    or deleted); the sibling's path."""
    if not entries:
        return None
    out = Path(out)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = out.parent / f"{out.name}{REPLACED_SUFFIX}{stamp}"
    n = 1
    while dest.exists():
        n += 1
        dest = out.parent / f"{out.name}{REPLACED_SUFFIX}{stamp}-{n}"
    try:
        dest.mkdir()
        for entry in entries:
            os.replace(entry, dest / entry.name)
    except OSError as e:
        raise ChattuneError(f"--overwrite could not move the contents of {out} to {dest}: {e.strerror} "
                            f"({e.filename}); move or delete them yourself") from None
    log.info(f"--overwrite: moved the earlier contents of {out} ({len(entries)} entries) to {dest}; delete it when "
             "you no longer need it")
    return dest


class _RunLogHandler(logging.FileHandler):
    def handleError(self, record):  # a full disk must not print a traceback per line: the terminal has them all
        pass


def attach_run_log(output_dir: Path) -> logging.Handler:
    handler = _RunLogHandler(output_dir / LOG_FILE)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    return handler


def log_error_to(handler: logging.Handler, error: BaseException) -> None:
    """End the run's own log with the line the user saw (only there: the terminal prints it already)."""
    if isinstance(error, ChattuneError):
        text = f"{getattr(error, 'prefix', 'error: ')}{error}"
    elif isinstance(error, KeyboardInterrupt):
        text = "interrupted"
    else:
        text = f"error: unexpected {type(error).__name__}: {error}"
    handler.handle(log.makeRecord(log.name, logging.ERROR, __file__, 0, text, None, None))


def resolve_resume(resume, output_dir: Path):
    """None, or the checkpoint to continue from: the newest complete one, or the one named."""
    if resume in (False, None):
        if checkpoint_dirs(output_dir):
            raise ChattuneError(f"{output_dir} already holds checkpoints of an earlier run: pass --resume to continue "
                                "it, or choose another --output-dir")
        return None
    if resume is True:
        found, skipped = newest_complete(output_dir)
        for path, reason in skipped:
            log.warning(f"skipping {path.name}: {reason}")
        if found is None:
            raise CheckpointError(f"--resume: no complete checkpoint in {output_dir} to continue from"
                                  + (f" ({len(skipped)} incomplete skipped)" if skipped else ""))
        return str(found)
    path = Path(resume)
    check_resume_target(path)
    return str(path)


def saved_state(checkpoint) -> dict:
    try:
        return json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return {}


def check_schedule(checkpoint, max_steps: int | None, scheduler: str, asked: str | None = None) -> None:
    """Refuse a resume whose total number of steps differs from the checkpoint's, for schedules that depend
    on it: the restored scheduler keeps its step count but its curve is rebuilt for the new total, so the
    learning rate would jump (after a finished cosine run, from about 0 back up towards the peak)."""
    saved = saved_state(checkpoint).get("max_steps")
    if max_steps is None or not saved or max_steps == saved or scheduler == "constant":
        return
    name = Path(checkpoint).name
    raise ChattuneError(
        f"--resume: {name} belongs to a run of {saved} steps, and its {scheduler} learning-rate schedule was set for "
        f"{saved} steps; {asked or f'--max-steps {max_steps}'} would change that schedule midway. Resume with "
        f"--max-steps {saved} (or the epochs it had), or start a new run from its weights: --model {checkpoint} "
        "--output-dir NEW_DIR")


def truncate_metrics(output_dir: Path, step: int) -> int:
    """Drop metrics.jsonl records after `step` (those of the steps a resumed run repeats), atomically; the
    number of records dropped."""
    path = Path(output_dir) / METRICS_FILE
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines()
    kept = []
    for line in lines:
        try:
            if json.loads(line).get("step", 0) > step:
                continue
        except (ValueError, AttributeError):
            continue  # a line cut short by a kill
        kept.append(line)
    if len(kept) == len(lines):
        return 0
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
    return len(lines) - len(kept)
