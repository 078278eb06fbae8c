"""`ulimit -f` (issue 11, case 9): a write past the limit fails with EFBIG (CPython ignores SIGXFSZ from
startup, so the process is not killed) and the run ends with one line naming the file and the cause, with
no --resume advice when no checkpoint exists."""

from __future__ import annotations

import resource
import subprocess

from conftest import ROOT, cli_command, cli_env

LIMIT = 100_000  # bytes: the tiny model's weights (about 170 kB) are the first file past it


def limit_file_size():
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, LIMIT))


def test_a_file_size_limit_ends_the_run_with_one_line(model_dir, ultrachat_dir, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        cli_command("train", "--model", model_dir, "--dataset", ultrachat_dir, "--train-split", "train_gen",
                    "--output-dir", out, "--max-steps", 2, "--save-steps", 2, "--no-eval-baseline"),
        capture_output=True, text=True, env=cli_env(), cwd=ROOT, timeout=600, preexec_fn=limit_file_size)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])  # not killed by SIGXFSZ (-25)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-2000:]
    assert "File too large" in errors[0] and str(out) in errors[0] and "checkpoint-2" in errors[0]
    assert "--resume" not in errors[0]  # nothing to resume from
    assert not (out / "checkpoint-2").exists()
