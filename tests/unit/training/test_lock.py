"""One run per output directory (issue 11, case 1): a second run into a directory another run holds is
refused with one line naming the holder; a lock left by a killed run is taken over, with a log line."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from chattune.commands.train import run_train
from chattune.config import Config
from chattune.errors import ChattuneError
from chattune.outputs import CONFIG_FILE, LOCK_FILE, METRICS_FILE
from chattune.training.lock import OutputDirBusy, RunLock

# a run that holds the lock until the test closes its standard input
HOLDER = """
import sys
from chattune.training.lock import RunLock
with RunLock(sys.argv[1], command="chattune train --output-dir elsewhere"):
    print("held", flush=True)
    sys.stdin.read()
"""


def start_holder(out) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=os.environ.copy())
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.fixture()
def holder(tmp_path):
    proc = start_holder(tmp_path / "out")
    yield proc
    proc.stdin.close()
    proc.wait(timeout=60)


def test_a_second_holder_is_refused_with_one_line_naming_the_first(tmp_path, holder):
    with pytest.raises(OutputDirBusy) as e:
        with RunLock(tmp_path / "out"):
            pass
    msg = str(e.value)
    assert "\n" not in msg
    assert f"pid {holder.pid} on {socket.gethostname()}" in msg and "started" in msg
    assert "chattune train --output-dir elsewhere" in msg
    assert (tmp_path / "out" / LOCK_FILE).is_file()  # the holder's record is left alone


def test_a_lock_left_by_a_killed_run_is_taken_over_and_said(tmp_path, caplog):
    out = tmp_path / "out"
    proc = start_holder(out)
    proc.kill()  # SIGKILL: no cleanup runs, the record stays, the OS drops the lock
    proc.wait(timeout=60)
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == proc.pid
    with caplog.at_level("INFO", logger="chattune"):
        with RunLock(out, command="second"):
            record = json.loads((out / LOCK_FILE).read_text())
            assert record["pid"] == os.getpid() and record["command"] == "second"
    assert f"pid {proc.pid}" in caplog.text and "no longer running" in caplog.text
    assert not (out / LOCK_FILE).exists()  # released on exit


def test_the_lock_is_reentrant_within_one_process(tmp_path):
    out = tmp_path / "out"
    with RunLock(out):
        with RunLock(out):  # the quickstart holds it, and run_train takes it again
            pass
        assert (out / LOCK_FILE).is_file()  # still held by the outer one
    assert not (out / LOCK_FILE).exists()


def test_a_training_run_into_a_held_directory_writes_nothing(model_dir, ultrachat_dir, tmp_path, holder):
    cfg = Config()
    cfg.model.name, cfg.data.dataset, cfg.data.train_split = str(model_dir), str(ultrachat_dir), "train_gen"
    out = tmp_path / "out"
    cfg.train.output_dir, cfg.train.max_steps, cfg.train.eval_baseline = str(out), 2, False
    with pytest.raises(ChattuneError, match=f"in use by another chattune run \\(pid {holder.pid}"):
        run_train(cfg)
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]
    assert not (out / CONFIG_FILE).exists() and not (out / METRICS_FILE).exists()
