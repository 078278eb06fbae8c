"""One run per output directory: an exclusive lock held for the whole run.

OUTPUT/.chattune.lock records who holds the directory (pid, host, start time, command) and is locked with
flock(2) on an open descriptor for as long as the run lasts. The operating system drops that lock when
the process ends, however it ends, so a lock file left behind by a killed run is recognised as stale (it
can be locked again) and taken over, with a log line. The Trainer and accelerate have no such guard: two
runs into one directory would replace each other's checkpoints and interleave metrics.jsonl.

In a multi-process run only rank 0 takes it (steps.run_directory). Within one process the lock is
re-entrant: the quickstart holds it while it builds its folder and `run_train` takes it again inside.
Used as a context manager by every recipe that writes a run directory (train; dpo later).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shlex
import socket
import sys
import time
from pathlib import Path

from chattune.errors import ChattuneError
from chattune.outputs import LOCK_FILE

try:
    import fcntl
except ImportError:  # Windows: no flock; the pid check below still refuses a live holder on this host
    fcntl = None

log = logging.getLogger("chattune")

_HELD: dict[str, list] = {}  # resolved lock path -> [open descriptor, depth], for re-entry in one process


class OutputDirBusy(ChattuneError):
    """Another run holds the output directory."""


def _describe(record: dict) -> str:
    started = record.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    command = f": {record['command']}" if record.get("command") else ""
    return f"pid {record.get('pid', '?')} on {record.get('host', '?')}, started {when}{command}"


def _read(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = json.loads(os.read(fd, 1 << 16) or b"{}")
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _alive_here(record: dict) -> bool:
    """Whether the record names a process still running on this host (for file systems without flock)."""
    if record.get("host") != socket.gethostname() or not isinstance(record.get("pid"), int):
        return False
    try:
        os.kill(record["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return record["pid"] != os.getpid()


def _try_lock(fd: int) -> bool:
    """True when this descriptor now holds the lock; False when another process does."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):  # some network file systems
            log.warning(f"the file system of {LOCK_FILE} cannot lock files; relying on its pid record only")
            return True
        raise


def _command() -> str:
    return shlex.join(["chattune", *sys.argv[1:]]) if sys.argv and sys.argv[0] else "python"


class RunLock:
    """`with RunLock(output_dir, command=...):` holds output_dir for this process, or raises OutputDirBusy."""

    def __init__(self, output_dir, command: str | None = None):
        self.dir = Path(output_dir)
        self.path = self.dir / LOCK_FILE
        self.command = command or _command()
        self._key: str | None = None

    def __enter__(self) -> RunLock:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._key = str(self.path.resolve())
        if self._key in _HELD:
            _HELD[self._key][1] += 1
            return self
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                locked = _try_lock(fd)
                previous = _read(fd)
                if not locked or (fcntl is None and _alive_here(previous)):
                    raise OutputDirBusy(f"{self.dir} is in use by another chattune run ({_describe(previous)}); "
                                        "wait for it to finish, stop it, or choose another --output-dir")
                # the file may have been removed by its last holder between our open and our lock: retry
                if not self.path.exists() or os.fstat(fd).st_ino != os.stat(self.path).st_ino:
                    os.close(fd)
                    continue
            except BaseException:
                os.close(fd)
                raise
            break
        if previous.get("pid") is not None:
            log.info(f"{self.dir} had a lock left by {_describe(previous)}, which is no longer running; taking it over")
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "command": self.command}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(record).encode())
        os.fsync(fd)
        _HELD[self._key] = [fd, 1]
        return self

    def __exit__(self, *exc) -> None:
        held = _HELD.get(self._key)
        if held is None:
            return
        held[1] -= 1
        if held[1] > 0:
            return
        del _HELD[self._key]
        try:
            self.path.unlink()  # removed while still locked, so no one can take the old file meanwhile
        except OSError:
            pass
        os.close(held[0])  # closing drops the flock
