"""The final model directory is written atomically with a completion manifest (issue 11, case 3): a save
stopped midway is detected, and chat, eval, serve, merge, export and push refuse it with one line naming the
fix; directories without chattune's manifest (plain model directories, older runs) keep working."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from chattune.cli import main
from chattune.commands.train import run_train
from chattune.config import Config
from chattune.errors import ChattuneError
from chattune.model.manifest import check_complete
from chattune.outputs import ADAPTER_CONFIG_FILE, FINAL_STAGING, MODEL_MANIFEST


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs (not even `except Exception` handlers)."""


def small_run(model_dir, ultrachat_dir, out, **train) -> Config:
    cfg = Config()
    cfg.model.name = str(model_dir)
    cfg.data.dataset, cfg.data.train_split = str(ultrachat_dir), "train_gen"
    t = cfg.train
    t.output_dir, t.batch_size, t.max_steps, t.save_steps, t.lr, t.eval_baseline = str(out), 4, 2, 2, 1e-3, False
    for k, v in train.items():
        setattr(t, k, v)
    return cfg


def test_a_finished_run_has_a_manifest_of_its_model_files(trained_dir):
    manifest = json.loads((trained_dir / MODEL_MANIFEST).read_text())
    files = manifest["files"]
    for name in ("model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja"):
        assert files[name]["size"] == (trained_dir / name).stat().st_size, name
        assert files[name]["digest"]
    assert not (trained_dir / FINAL_STAGING).exists()
    check_complete(trained_dir)


def one_line_refusal(capsys, argv) -> str:
    capsys.readouterr()  # what earlier steps printed
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_a_final_save_killed_midway_is_refused_until_resumed(model_dir, ultrachat_dir, tmp_path, monkeypatch,
                                                               capsys):
    out = tmp_path / "out"
    real_replace = os.replace
    moved = []

    def replace(src, dst, *a, **kw):  # the process dies after the first file of the final model is in place
        if FINAL_STAGING in str(src) and os.path.isfile(src):
            if moved:
                raise Killed
            moved.append(dst)
        return real_replace(src, dst, *a, **kw)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(Killed):
        run_train(small_run(model_dir, ultrachat_dir, out))
    monkeypatch.setattr(os, "replace", real_replace)
    assert len(moved) == 1

    with pytest.raises(ChattuneError, match="did not finish.*--resume"):
        check_complete(out)
    for argv in (["chat", str(out), "--message", "hi"], ["eval", str(out), "--split", "test_gen"],
                 ["push", str(out), "--repo", "me/x", "--dry-run", "--output-dir", str(tmp_path / "up")],
                 ["serve", str(out), "--port", "0"],
                 ["export", str(out), "--output-dir", str(tmp_path / "gguf")]):
        err = one_line_refusal(capsys, argv)
        assert "incomplete" in err and "--resume" in err, (argv, err)
    assert not (tmp_path / "up").exists() and not (tmp_path / "gguf").exists()

    run_train(small_run(model_dir, ultrachat_dir, out, resume=True))  # the fix the message names
    check_complete(out)
    assert main(["chat", str(out), "--message", "hi", "--max-new-tokens", "2"]) == 0


def test_a_truncated_model_file_is_refused(trained_dir, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(trained_dir, out, ignore=shutil.ignore_patterns("checkpoint-*"))
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ChattuneError) as e:
        check_complete(out)
    assert "model.safetensors" in str(e.value) and "incomplete" in str(e.value)
    assert "--resume" not in str(e.value)  # no checkpoint here to resume from: train it again


def test_directories_without_the_manifest_keep_working(model_dir, trained_dir, tmp_path):
    check_complete(model_dir)  # a plain model directory
    older = tmp_path / "older-run"  # a run written before the manifest existed
    shutil.copytree(trained_dir, older, ignore=shutil.ignore_patterns("checkpoint-*", MODEL_MANIFEST))
    check_complete(older)
    assert main(["chat", str(older), "--message", "hi", "--max-new-tokens", "2"]) == 0


def test_text_files_edited_by_hand_are_not_damage_but_missing_ones_are(trained_dir, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(trained_dir, out, ignore=shutil.ignore_patterns("checkpoint-*"))
    (out / "chat_template.jinja").write_text("{{ messages[0].content }}")  # a template fixed on purpose
    check_complete(out, content=True)
    (out / "tokenizer.json").unlink()
    with pytest.raises(ChattuneError, match="tokenizer.json is missing"):
        check_complete(out)


def test_an_adapter_whose_final_save_did_not_finish_is_refused_before_its_base_loads(model_dir, tmp_path, capsys,
                                                                                     monkeypatch):
    import chattune.model.adapters as adapters

    def no_base(*a, **kw):
        raise AssertionError("the base model was loaded for an incomplete adapter")

    monkeypatch.setattr(adapters, "load_pretrained", no_base)
    adapter = tmp_path / "lora-out"  # a --lora run killed while its final adapter was renamed into place
    adapter.mkdir()
    (adapter / ADAPTER_CONFIG_FILE).write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path":
                                                           str(model_dir), "r": 8}))
    (adapter / MODEL_MANIFEST).write_text(json.dumps({"hash": "xxh3_128", "complete": False, "files": {}}))
    for argv in (["merge", str(adapter), "--output-dir", str(tmp_path / "merged")],
                 ["chat", str(adapter), "--message", "hi"],
                 ["export", str(adapter), "--output-dir", str(tmp_path / "gguf")]):
        err = one_line_refusal(capsys, argv)
        assert "incomplete" in err and "did not finish" in err, (argv, err)
    assert not (tmp_path / "merged").exists() and not (tmp_path / "gguf").exists()
