"""`chattune quickstart` never deletes an earlier quickstart folder unless --overwrite, which moves it aside
(issue 11, case 14), and rejects a --max-steps below 1 (case 15)."""

from __future__ import annotations

import json

import pytest

from chattune.cli import main
from chattune.commands.quickstart import prepare_output_dir
from chattune.errors import ChattuneError
from chattune.outputs import QUICKSTART_MARKER, REPLACED_SUFFIX


def earlier_quickstart(out):
    out.mkdir()
    (out / QUICKSTART_MARKER).write_text(json.dumps({"created_by": "chattune quickstart"}))
    (out / "model.safetensors").write_bytes(b"a 20-minute run")
    (out / "my-notes.txt").write_text("mine")
    return out


def test_an_earlier_quickstart_is_kept_without_overwrite(tmp_path, capsys):
    out = earlier_quickstart(tmp_path / "qs")
    assert main(["quickstart", "--output-dir", str(out), "--max-steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert (out / "model.safetensors").read_bytes() == b"a 20-minute run" and (out / "my-notes.txt").exists()


def test_overwrite_moves_the_earlier_quickstart_aside(tmp_path):
    out = earlier_quickstart(tmp_path / "qs")
    prepare_output_dir(out, overwrite=True)
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("qs" + REPLACED_SUFFIX)]
    assert len(aside) == 1 and (aside[0] / "my-notes.txt").read_text() == "mine"
    assert [p.name for p in out.iterdir() if not p.name.startswith(".")] == []


def test_a_foreign_directory_is_refused_even_with_overwrite(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(ChattuneError, match="not an earlier quickstart"):
        prepare_output_dir(tmp_path, overwrite=True)
    assert (tmp_path / "keep.txt").exists()


@pytest.mark.parametrize("steps", ["0", "-3"])
def test_max_steps_below_one_is_rejected_before_anything_is_built(tmp_path, capsys, steps):
    out = tmp_path / "qs"
    assert main(["quickstart", "--output-dir", str(out), "--max-steps", steps]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: --max-steps must be at least 1, got {steps}"
    assert not out.exists()
