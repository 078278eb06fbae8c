"""The run directory: its log file, and which checkpoint (if any) a run continues from."""

from __future__ import annotations

import logging
from pathlib import Path

from chattune.errors import ChattuneError
from chattune.outputs import LOG_FILE
from chattune.training.checkpoints import CheckpointError, check_resume_target, checkpoint_dirs, newest_complete

log = logging.getLogger("chattune")


def attach_run_log(output_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(output_dir / LOG_FILE)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    return handler


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
