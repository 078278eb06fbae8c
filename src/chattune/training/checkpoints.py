"""Checkpoints that resume can trust.

The Trainer writes `checkpoint-N` in place, so a crash or a full disk mid-save leaves a partial
directory that transformers' `get_last_checkpoint` would resume from. Here each checkpoint is
written into a staging directory, given a manifest (every file with its size) and only then
renamed into place; resume takes the newest checkpoint whose files all match their manifest, so a
half-written or hand-truncated checkpoint is skipped in favour of the previous complete one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from chattune.errors import ChattuneError
from chattune.outputs import CHECKPOINT_MANIFEST as MANIFEST
from chattune.outputs import CHECKPOINT_STAGING as STAGING
from chattune.training.distributed import any_rank

log = logging.getLogger("chattune")

_NAME = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


class CheckpointError(ChattuneError):
    """A checkpoint could not be written, or none can be resumed from."""


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a directory; the rename is still atomic
        pass
    finally:
        os.close(fd)


def write_manifest(directory: Path, step: int) -> Path:
    """Record every file of a finished checkpoint with its size, flushed to disk, written last."""
    directory = Path(directory)
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST):
        _fsync(path)
        files[path.relative_to(directory).as_posix()] = path.stat().st_size
    tmp = directory / (MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"step": step, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / MANIFEST)
    _fsync(directory)
    return directory / MANIFEST


def problem(directory: Path) -> str | None:
    """Why `directory` cannot be resumed from, or None when every file matches its manifest."""
    directory = Path(directory)
    manifest = directory / MANIFEST
    if not manifest.is_file():
        return "it has no completion record (its save did not finish)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"its {MANIFEST} is unreadable"
    for name, size in files.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        actual = path.stat().st_size
        if actual != size:
            return f"{name} has {actual} bytes where {size} were written (truncated or changed)"
    return None


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """checkpoint-N directories, newest (highest N) first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def newest_complete(output_dir: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest complete checkpoint, and the newer ones skipped with the reason for each."""
    skipped = []
    for path in checkpoint_dirs(output_dir):
        reason = problem(path)
        if reason is None:
            return path, skipped
        skipped.append((path, reason))
    return None, skipped


def check_resume_target(path: Path) -> None:
    """An explicitly named checkpoint: refuse an incomplete one, warn about one without a manifest."""
    if not path.is_dir():
        raise CheckpointError(f"--resume: checkpoint directory not found: {path}")
    reason = problem(path)
    if reason is None:
        return
    if not (path / MANIFEST).is_file() and (path / "trainer_state.json").is_file():
        log.warning(f"{path} was not written by chattune, so its completeness cannot be checked; resuming anyway")
        return
    raise CheckpointError(f"--resume: {path} cannot be resumed from: {reason}. Pass --resume without a path to use "
                          "the newest complete checkpoint")


def discard_staging(output_dir: Path) -> None:
    """Remove what an interrupted save left in the staging directory (never a complete checkpoint)."""
    staging = Path(output_dir) / STAGING
    if staging.exists():
        log.info(f"removing an unfinished checkpoint save left in {staging}")
        shutil.rmtree(staging, ignore_errors=True)


class AtomicCheckpoints:
    """Trainer mixin: each checkpoint appears whole under its final name, or not at all.

    The Trainer's own save code runs unchanged (every engine keeps its format: DDP, FSDP, DeepSpeed
    shards, per-rank RNG states) but into OUTPUT/.checkpoint-staging; rank 0 then writes the manifest
    and renames the directory into place. A failed write (disk full, permissions) removes the staged
    files, keeps the previous checkpoints, and stops the run with a CheckpointError that says so.
    """

    _staging_dir: str | None = None

    def _get_output_dir(self, trial) -> str:
        if self._staging_dir is not None:
            return self._staging_dir
        return super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = Path(super()._get_output_dir(trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging, final = run_dir / STAGING, run_dir / name
        error = None
        try:
            if self.args.should_save:
                shutil.rmtree(staging, ignore_errors=True)
                staging.mkdir(parents=True)
        except OSError as e:
            error = e
        self.accelerator.wait_for_everyone()
        if not self._any_failed(error):
            self._staging_dir = str(staging)
            try:
                super()._save_checkpoint(model, trial)
            except Exception as e:  # disk full surfaces as OSError, RuntimeError (torch.save) or SafetensorError
                error = e
            finally:
                self._staging_dir = None
        if not self._any_failed(error):
            self._name_best_checkpoint(run_dir, staging / name)
        if not self._any_failed(error) and self.args.should_save:
            try:
                write_manifest(staging / name, self.state.global_step)
                if final.exists():  # an incomplete leftover that resume skipped: set it aside, then replace it
                    os.replace(final, staging / f"replaced-{name}")
                os.replace(staging / name, final)
                _fsync(run_dir)
            except OSError as e:
                error = e
        if self._any_failed(error):
            self._checkpoint_failed(run_dir, name, error)
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
            # by step number, which is what resume reads (mtime is unreliable on network file systems)
            rotate_checkpoints(output_dir=str(run_dir), save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=False)
        self.accelerator.wait_for_everyone()

    def _name_best_checkpoint(self, run_dir: Path, staged: Path) -> None:
        """transformers looked for the best checkpoint (metric_for_best_model) under the staging directory: name
        it where it lives, so rotation keeps it, --load-best finds it and the staged trainer state says so."""
        from transformers.trainer import TRAINER_STATE_NAME

        step = self.state.best_global_step
        if not step:
            return
        best = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{step}"
        if step == self.state.global_step or best.is_dir():
            self.state.best_model_checkpoint = str(best)
        if self.args.should_save and (staged / TRAINER_STATE_NAME).is_file():
            self.state.save_to_json(str(staged / TRAINER_STATE_NAME))

    def _any_failed(self, error) -> bool:
        return any_rank([error is not None], self.args.device)[0]

    def _checkpoint_failed(self, run_dir: Path, name: str, error: Exception | None) -> None:
        if self.args.should_save:
            shutil.rmtree(run_dir / STAGING, ignore_errors=True)
        previous, _ = newest_complete(run_dir)
        kept = (f"the previous checkpoint, {previous}, is intact" if previous is not None
                else "no earlier checkpoint exists")
        if error is None:
            cause = "the save failed on another process"
        elif isinstance(error, OSError) and error.strerror:
            cause = error.strerror + (f" ({error.filename})" if error.filename else "")
        else:
            cause = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        raise CheckpointError(f"could not write {name} in {run_dir}: {cause}. Training stopped; {kept}. Free disk "
                              "space or fix the permissions, then rerun the same command with --resume")
