"""Checkpoints verified by content (issue 11, case 4): a same-size change fails its checksum; a checkpoint
that cannot be loaded is skipped with its reason for the next older one; non-finite weights or optimizer
state found after loading stop the run with a clear message."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from chattune.commands.train import run_train
from chattune.config import Config
from chattune.errors import ChattuneError
from chattune.outputs import CHECKPOINT_MANIFEST
from chattune.training.checkpoints import newest_complete, problem, write_manifest


def fake_checkpoint(root, step):
    d = root / f"checkpoint-{step}"
    d.mkdir(parents=True)
    save_file({"w": torch.zeros(25)}, d / "model.safetensors")
    torch.save({"state": {}, "param_groups": []}, d / "optimizer.pt")
    write_manifest(d, step)
    return d


def flip_a_byte(path, at: int = 0):
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_same_size_change_fails_the_checksum(tmp_path):
    older, newer = fake_checkpoint(tmp_path, 2), fake_checkpoint(tmp_path, 4)
    flip_a_byte(newer / "optimizer.pt", (newer / "optimizer.pt").stat().st_size // 2)
    assert "optimizer.pt" in problem(newer) and "checksum" in problem(newer)
    found, skipped = newest_complete(tmp_path)
    assert found == older and skipped[0][0] == newer


def small_run(model_dir, ultrachat_dir, out, **train) -> Config:
    cfg = Config()
    cfg.model.name = str(model_dir)
    cfg.data.dataset, cfg.data.train_split = str(ultrachat_dir), "train_gen"
    t = cfg.train
    t.output_dir, t.batch_size, t.max_steps, t.save_steps, t.logging_steps, t.lr = str(out), 4, 6, 2, 1, 1e-3
    t.save_total_limit, t.eval_baseline = 5, False
    for k, v in train.items():
        setattr(t, k, v)
    return cfg


@pytest.fixture(scope="module")
def finished(model_dir, ultrachat_dir, tmp_path_factory):
    """A 6-step run with checkpoints 2, 4 and 6; each test works on a copy."""
    out = tmp_path_factory.mktemp("verified") / "out"
    run_train(small_run(model_dir, ultrachat_dir, out))
    return out


def copy_of(finished, tmp_path, drop=()):
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    for step in drop:
        shutil.rmtree(out / f"checkpoint-{step}")
    (out / "model.safetensors").unlink()
    return out


def rerecord(checkpoint):
    """Rewrite the manifest after a change: the file then matches it (bad data written as such, or a
    checkpoint from a chattune that recorded sizes only)."""
    step = json.loads((checkpoint / CHECKPOINT_MANIFEST).read_text())["step"]
    write_manifest(checkpoint, step)


@pytest.mark.parametrize("name", ["rng_state.pth", "trainer_state.json"])
def test_a_checkpoint_that_cannot_be_loaded_is_skipped_for_the_previous_one(
        finished, model_dir, ultrachat_dir, tmp_path, caplog, name):
    out = copy_of(finished, tmp_path)
    path = out / "checkpoint-6" / name
    path.write_bytes(b"\x00" * path.stat().st_size)
    rerecord(out / "checkpoint-6")
    with caplog.at_level("INFO", logger="chattune"):
        run_train(small_run(model_dir, ultrachat_dir, out, resume=True))
    assert f"skipping checkpoint-6: {name} cannot be loaded" in caplog.text
    assert f"resuming from {out / 'checkpoint-4'}" in caplog.text
    assert json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())["global_step"] == 6


def test_non_finite_weights_after_loading_stop_the_run(finished, model_dir, ultrachat_dir, tmp_path):
    out = copy_of(finished, tmp_path, drop=(6,))
    weights = load_file(out / "checkpoint-4" / "model.safetensors")
    name = next(iter(weights))
    weights[name][0] = float("nan")
    save_file(weights, out / "checkpoint-4" / "model.safetensors", metadata={"format": "pt"})
    rerecord(out / "checkpoint-4")
    with pytest.raises(ChattuneError, match="checkpoint-4 holds NaN or infinite weights"):
        run_train(small_run(model_dir, ultrachat_dir, out, resume=True))
    assert not (out / "model.safetensors").exists()


def test_non_finite_optimizer_state_after_loading_stops_the_run(finished, model_dir, ultrachat_dir, tmp_path):
    out = copy_of(finished, tmp_path, drop=(6,))
    path = out / "checkpoint-4" / "optimizer.pt"
    state = torch.load(path, weights_only=True)
    first = next(iter(state["state"].values()))
    first["exp_avg"].view(-1)[0] = float("nan")  # the same-size flip gave NaN weights
    torch.save(state, path)
    rerecord(out / "checkpoint-4")
    with pytest.raises(ChattuneError, match="checkpoint-4 holds NaN or infinite optimizer state"):
        run_train(small_run(model_dir, ultrachat_dir, out, resume=True))
