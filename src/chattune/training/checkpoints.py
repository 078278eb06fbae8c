"""Checkpoints that resume can trust.

The Trainer writes `checkpoint-N` in place, so a crash or a full disk mid-save leaves a partial
directory that transformers' `get_last_checkpoint` would resume from. Here each checkpoint is
written into a staging directory, given a manifest (every file with its size and checksum,
model/manifest.py) and only then renamed into place. Resume takes the newest checkpoint whose files all
match their manifest and whose small files load: a half-written, truncated, bit-flipped or unloadable
checkpoint is skipped, with its reason, in favour of the previous one.

(transformers and torch are imported inside the functions that need them: the output-directory checks
that use this module run before `chattune train` imports them.)
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

from chattune.errors import ChattuneError
from chattune.model.manifest import HASH, describe, files_problem, fsync_path, read_record, write_record
from chattune.outputs import CHECKPOINT_MANIFEST as MANIFEST
from chattune.outputs import CHECKPOINT_PREFIX
from chattune.outputs import CHECKPOINT_STAGING as STAGING

log = logging.getLogger("chattune")

_NAME = re.compile(rf"^{CHECKPOINT_PREFIX}-(\d+)$")


class CheckpointError(ChattuneError):
    """A checkpoint could not be written, or none can be resumed from."""


_fsync = fsync_path


def write_manifest(directory: Path, step: int) -> Path:
    """Record every file of a finished checkpoint with its size and checksum, flushed to disk, written last."""
    directory = Path(directory)
    names = sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                   if p.is_file() and p.name not in (MANIFEST, MANIFEST + ".tmp"))
    return write_record(directory / MANIFEST, {"step": step, "hash": HASH, "files": describe(directory, names)})


def problem(directory: Path, content: bool = True) -> str | None:
    """Why `directory` cannot be resumed from, or None when every file matches its manifest (sizes, and
    checksums unless content=False) and its small files load."""
    directory = Path(directory)
    manifest = directory / MANIFEST
    if not manifest.is_file():
        return "it has no completion record (its save did not finish)"
    record = read_record(manifest)
    if record is None:
        return f"its {MANIFEST} is unreadable"
    return files_problem(directory, record, content) or (load_problem(directory) if content else None)


def load_problem(directory: Path) -> str | None:
    """Why the checkpoint's files would not load, or None: trainer_state.json, the RNG and scheduler states,
    the headers of the weights and the structure of the optimizer state (mapped, not read). A checkpoint that
    passes its checksums may still hold bad data (written by an older chattune that recorded sizes only, or
    broken before it was saved); without this, every --resume would crash on it."""
    import torch
    from safetensors import safe_open
    from transformers.trainer_pt_utils import safe_globals

    directory = Path(directory)
    for path in sorted(directory.glob("trainer_state.json")):
        try:
            state = json.loads(path.read_text())
            int(state["global_step"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            return f"{path.name} cannot be loaded ({type(e).__name__})"
    for pattern in ("*.safetensors", "rng_state*.pth", "scheduler.pt", "optimizer.pt"):
        for path in sorted(directory.glob(pattern)):
            try:
                if path.suffix == ".safetensors":
                    with safe_open(str(path), "pt"):
                        pass
                else:
                    with safe_globals():  # the numpy RNG state, as the Trainer loads it
                        torch.load(path, map_location="cpu", weights_only=True, mmap=path.name == "optimizer.pt")
            except Exception as e:  # a corrupt zip, pickle or header raises whatever its reader raises
                first = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
                return f"{path.name} cannot be loaded ({first})"
    return None


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """checkpoint-N directories, newest (highest N) first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def newest_complete(output_dir: Path, content: bool = True) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest complete checkpoint, and the newer ones skipped with the reason for each; content=False
    checks sizes only (to name a checkpoint in a message, not to resume from it)."""
    skipped = []
    for path in checkpoint_dirs(output_dir):
        reason = problem(path, content)
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
        reason = load_problem(path)
        if reason is not None:
            raise CheckpointError(f"--resume: {path} cannot be resumed from: {reason}")
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
        from transformers.trainer_utils import rotate_checkpoints

        run_dir = Path(super()._get_output_dir(trial))
        name = f"{CHECKPOINT_PREFIX}-{self.state.global_step}"
        if self.args.should_save:
            log.info(f"saving {name} ...")
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
        best = run_dir / f"{CHECKPOINT_PREFIX}-{step}"
        if step == self.state.global_step or best.is_dir():
            self.state.best_model_checkpoint = str(best)
        if self.args.should_save and (staged / TRAINER_STATE_NAME).is_file():
            self.state.save_to_json(str(staged / TRAINER_STATE_NAME))

    def _any_failed(self, error) -> bool:
        from chattune.training.distributed import any_rank

        return any_rank([error is not None], self.args.device)[0]

    def _checkpoint_failed(self, run_dir: Path, name: str, error: Exception | None) -> None:
        if self.args.should_save:
            shutil.rmtree(run_dir / STAGING, ignore_errors=True)
        previous, _ = newest_complete(run_dir, content=False)
        if previous is not None:
            kept = (f"the previous checkpoint, {previous}, is intact. Free disk space or fix the permissions, then "
                    "rerun the same command with --resume")
        else:  # nothing to resume from: advising --resume would only fail again
            kept = ("no earlier checkpoint exists. Free disk space or fix the permissions, then run the training "
                    "again")
        if error is None:
            cause = "the save failed on another process"
        elif isinstance(error, OSError) and error.strerror:
            cause = error.strerror + (f" ({error.filename})" if error.filename else "")
        else:
            cause = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        raise CheckpointError(f"could not write {name} in {run_dir}: {cause}. Training stopped; {kept}")
