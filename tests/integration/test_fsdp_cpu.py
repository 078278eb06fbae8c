"""FSDP2 on CPUs over gloo (PyTorch's fully_shard runs there): chattune's selective-head loss with weights,
gradients and optimizer state sharded across 2 processes gives the per-step loss of one unsharded process.

chattune's own FSDP route (`accelerate launch --config_file configs/accelerate/fsdp.yaml`) cannot be run on CPUs:
accelerate (1.15) turns FSDP on only for GPU-like process groups (a CPU launch becomes plain multi-CPU DDP,
tested in test_distributed.py), so that route is left to a machine with 2 GPUs (docs/performance.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, cli_env

WORKER = Path(__file__).with_name("fsdp2_worker.py")


def run(launcher: list[str], out: Path) -> list[float]:
    proc = subprocess.run([*launcher, str(WORKER), str(out)], capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env=cli_env({"OMP_NUM_THREADS": "1"}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())["losses"]


def test_two_fsdp2_processes_match_one_unsharded_process(tmp_path):
    one = run([sys.executable], tmp_path / "one.json")
    two = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29563"],
              tmp_path / "two.json")
    assert len(one) == len(two) == 6
    assert one[-1] < one[0] - 0.05  # the model did learn
    for a, b in zip(one, two):
        assert b == pytest.approx(a, rel=1e-5)
