"""`chattune push`: the dry run writes the exact folder and model card that would be uploaded, with no
secret in any file; without a token or a network, one clear line and a non-zero exit."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from chattune.cli import main

SECRET = "hf_publishtestsecret0123456789abcdefXYZ"


def test_dry_run_writes_the_folder_and_card_without_secrets(trained_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    dest = tmp_path / "upload"
    assert main(["push", str(trained_dir), "--repo", "someone/tiny-chat", "--dry-run", "--output-dir", str(dest)]) == 0
    printed = capsys.readouterr()
    assert "nothing was uploaded" in printed.out and SECRET not in printed.out + printed.err

    files = {str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()}
    for name in ("README.md", "model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "chat_template.jinja", "chattune.yaml", "results.json", "report.md",
                 "plots/loss.png"):
        assert name in files, name
    assert not any(f.startswith("checkpoint-") or f.endswith(".bin") or f in ("train.log", "rejected.jsonl")
                   for f in files), files
    for path in dest.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path

    card = (dest / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "transformers" and "chattune" in front["tags"]
    assert "base_model" not in front  # the base was a local directory, not a hub id
    for section in ("## Training data", "## Training hyperparameters", "## Evaluation", "## How to chat with it",
                    "## Limitations"):
        assert section in card, section
    assert 'AutoTokenizer.from_pretrained("someone/tiny-chat")' in card and "apply_chat_template" in card
    assert "| learning rate | 0.003 |" in card
    base_temp = str(trained_dir.parent.parent)  # holds the base model, the data and the run
    for name in ("README.md", "chattune.yaml", "report.md", "results.json"):
        assert base_temp not in (dest / name).read_text(), f"{name} names a local path"
    saved = yaml.safe_load((dest / "chattune.yaml").read_text())
    assert saved["model"]["name"] == yaml.safe_load((trained_dir / "chattune.yaml").read_text())["model"]["name"] \
        .rsplit("/", 1)[-1]
    eval_loss = yaml.safe_load((dest / "results.json").read_text())["eval"]["eval_loss"]
    assert f"{eval_loss:.4g}" in card


def test_a_file_holding_the_token_is_refused(trained_dir, tmp_path, monkeypatch, capsys):
    model = shutil.copytree(trained_dir, tmp_path / "m", ignore=shutil.ignore_patterns("checkpoint-*"))
    with open(model / "metrics.jsonl", "a") as f:
        f.write(f'{{"note": "{SECRET}"}}\n')
    monkeypatch.setenv("HF_TOKEN", SECRET)
    assert main(["push", str(model), "--repo", "someone/x", "--dry-run", "--output-dir", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert "refusing to upload: metrics.jsonl contains a Hugging Face token" in err and SECRET not in err


def test_push_without_a_token_fails_with_one_line(run_cli, trained_dir, tmp_path, monkeypatch):
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    # a home with no saved login
    proc = run_cli("push", trained_dir, "--repo", "someone/x", env={"HF_HOME": str(tmp_path / "hf-home")}, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("error: no Hugging Face token: set HF_TOKEN")


def test_push_without_network_fails_with_one_line(trained_dir, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", SECRET)  # the tests run with HF_HUB_OFFLINE=1: the hub cannot be reached
    assert main(["push", str(trained_dir), "--repo", "someone/x", "--private"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1
    # offline (as here) the hub cannot be reached; online, the made-up token is rejected: one line either way
    assert err.startswith(("error: cannot reach the Hugging Face hub", "error: the Hugging Face hub rejected"))
    assert SECRET not in captured.out + captured.err


def test_card_of_a_mixed_run_names_every_source_and_keeps_local_paths_home(tmp_path):
    from chattune.artifacts.card import build_card
    from chattune.artifacts.publish import _path_replacements

    local = tmp_path / "data" / "my-chats"
    run = tmp_path / "run"
    run.mkdir()
    mix = [{"dataset": "HuggingFaceH4/ultrachat_200k", "split": "train_gen", "samples": 100},
           {"dataset": str(local), "fraction": 0.5}]
    (run / "chattune.yaml").write_text(yaml.safe_dump(
        {"model": {"name": "gpt2"}, "data": {"dataset": None, "datasets": mix, "train_split": "train"},
         "train": {"output_dir": str(run), "lr": 2e-5}}))
    card = build_card(run, "someone/mixed")
    front = yaml.safe_load(card.split("---")[1])
    assert front["datasets"] == ["HuggingFaceH4/ultrachat_200k"]
    assert "ultrachat_200k" in card and "split `train_gen`" in card
    assert "`my-chats` (a local data set) (split `train`)" in card
    assert "None" not in card and str(tmp_path) not in card
    assert (str(local), "my-chats") in _path_replacements(run)


def test_a_name_the_hub_completes_to_owner_name_gets_a_card_naming_the_full_id(trained_dir, monkeypatch):
    """The hub is out of reach here: this double of HfApi stands for it and keeps what would be uploaded."""
    import huggingface_hub

    from chattune.artifacts.publish import upload

    sent = {}

    class Repo:
        repo_id = "someone/tiny-chat"

        def __str__(self):
            return "https://huggingface.co/someone/tiny-chat"

    class Api:
        def create_repo(self, repo, private=None, exist_ok=False):
            return Repo()

        def upload_folder(self, repo_id, folder_path, commit_message):
            root = Path(folder_path)
            sent.update(repo_id=repo_id, card=(root / "README.md").read_text(),
                        files=sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()))

    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    result = upload(Path(trained_dir), "tiny-chat", private=False, token=None)
    assert sent["repo_id"] == "someone/tiny-chat" and result["files"] == sent["files"]
    assert "someone/tiny-chat" in sent["card"] and "model.safetensors" in sent["files"]
