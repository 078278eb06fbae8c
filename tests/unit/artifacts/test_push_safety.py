"""`chattune push` uploads only what it should (issue 11, cases 10-13 and 20): no file reached through a link out
of the model directory, no token-shaped string anywhere (safetensors metadata included, checked before anything
is staged), held-out conversations only when the user lets them go, an adapter's base named as the hub knows
it; unreadable files and a blocked chat template stop with one line."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from chattune.cli import main

TOKEN_34 = "hf_" + "AbCdEfGhIjKlMnOpQrStUvWxYz01234567"  # the shape of today's hub tokens
TOKEN_24 = "hf_" + "Zy9Xw8Vu7Ts6Rq5Po4Nm3Lk2"  # shorter: the check must not depend on the exact length


@pytest.fixture()
def model(trained_dir, tmp_path):
    return shutil.copytree(trained_dir, tmp_path / "model", ignore=shutil.ignore_patterns("checkpoint-*"))


def _push(capsys, model, dest, *extra) -> tuple[int, str, str]:
    code = main(["push", str(model), "--repo", "someone/tiny", "--dry-run", "--output-dir", str(dest), *extra])
    captured = capsys.readouterr()
    assert "unexpected" not in captured.err and "Traceback" not in captured.err, captured.err
    return code, captured.out, captured.err.strip()


def _one_error_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# ---- case 10: clear messages -------------------------------------------------------------------------------

def test_output_dir_that_is_a_file_is_one_line(model, tmp_path, capsys):
    target = tmp_path / "a-file"
    target.write_text("mine")
    code, _, err = _push(capsys, model, target)
    assert code == 2 and f"{target} is a file" in _one_error_line(err)
    assert target.read_text() == "mine"


def test_truncated_results_json_stops_push_with_one_line(model, tmp_path, capsys):
    text = (model / "results.json").read_text()
    (model / "results.json").write_text(text[: len(text) // 2])
    code, _, err = _push(capsys, model, tmp_path / "up")
    line = _one_error_line(err)
    assert code == 2 and f"{model / 'results.json'} is not readable JSON" in line
    assert not (tmp_path / "up").exists()


def test_report_is_written_beside_a_truncated_results_json(model, caplog):
    from chattune.artifacts.report import write_run_report
    from chattune.config import Config, apply_values, read_saved

    broken = (model / "results.json").read_text()[:40]
    (model / "results.json").write_text(broken)
    (model / "report.md").unlink()
    cfg = apply_values(Config(), read_saved(model), str(model))
    with caplog.at_level("WARNING", logger="chattune"):
        write_run_report(cfg, model)
    assert (model / "report.md").is_file() and "results.json is not readable JSON" in caplog.text
    assert (model / "results.json").read_text() == broken  # left as found, never overwritten with less


@pytest.mark.parametrize("command", [["chat", "--message", "hi"], ["eval", "--samples", "1"]])
def test_a_chat_template_blocked_by_the_sandbox_is_named(model, capsys, command):
    (model / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content.__class__.__mro__ }}{% endfor %}")
    code = main([command[0], str(model), *command[1:]])
    err = capsys.readouterr().err.strip()
    line = _one_error_line(err)
    assert code == 2 and f"{model / 'chat_template.jinja'}: " in line and "sandbox" in line, line


# ---- case 11: links --------------------------------------------------------------------------------------------

def test_a_link_out_of_the_model_dir_is_refused(model, tmp_path, capsys):
    secret = tmp_path / "secret.txt"
    secret.write_text("password=hunter2\n")
    (model / "vocab.json").symlink_to(secret)
    code, _, err = _push(capsys, model, tmp_path / "up")
    line = _one_error_line(err)
    assert code == 2 and "vocab.json is a link to" in line and "outside" in line
    assert not (tmp_path / "up").exists()


def test_a_linked_folder_out_of_the_model_dir_is_refused(model, tmp_path, capsys):
    elsewhere = shutil.move(str(model / "plots"), str(tmp_path / "plots-elsewhere"))
    (model / "plots").symlink_to(elsewhere, target_is_directory=True)
    code, _, err = _push(capsys, model, tmp_path / "up")
    assert code == 2 and "plots/loss.png is a link to" in _one_error_line(err)


def test_a_link_inside_the_model_dir_is_uploaded_as_a_regular_file(model, tmp_path, capsys):
    (model / "keep").mkdir()
    shutil.move(str(model / "tokenizer.json"), str(model / "keep" / "tokenizer-real.json"))
    (model / "tokenizer.json").symlink_to("keep/tokenizer-real.json")
    code, _, _ = _push(capsys, model, tmp_path / "up")
    staged = tmp_path / "up" / "tokenizer.json"
    assert code == 0 and staged.is_file() and not staged.is_symlink()
    assert staged.read_bytes() == (model / "keep" / "tokenizer-real.json").read_bytes()


# ---- case 12: tokens -------------------------------------------------------------------------------------------

def test_a_token_in_safetensors_metadata_is_refused_before_staging(model, tmp_path, capsys, monkeypatch):
    from safetensors.torch import load_file, save_file

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no saved login: only the pattern can catch it
    weights = model / "model.safetensors"
    save_file(load_file(weights), weights, metadata={"format": "pt", "note": f"pushed with {TOKEN_34}"})
    (model / "chattune-model.json").unlink()  # weights rewritten by hand: the run's manifest would refuse them first
    dest = tmp_path / "up"
    code, _, err = _push(capsys, model, dest)
    line = _one_error_line(err)
    assert code == 2 and "model.safetensors contains a Hugging Face token" in line and TOKEN_34 not in line
    assert not dest.exists()  # nothing was staged: no token-bearing folder left on disk


@pytest.mark.parametrize("token", [TOKEN_34, TOKEN_24])
def test_token_shaped_strings_are_refused_whatever_their_length(model, tmp_path, capsys, monkeypatch, token):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    with open(model / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"note": token}) + "\n")
    dest = tmp_path / "up"
    dest.mkdir()  # an empty folder the user made: left empty
    code, _, err = _push(capsys, model, dest)
    assert code == 2 and "metrics.jsonl contains a Hugging Face token" in _one_error_line(err)
    assert list(dest.iterdir()) == []


# ---- case 13: held-out conversations in the report ------------------------------------------------------------

def test_push_says_the_report_holds_held_out_conversations_and_can_leave_them_out(model, tmp_path, capsys):
    report = (model / "report.md").read_text()
    assert "## Sample exchanges" in report
    code, out, _ = _push(capsys, model, tmp_path / "with")
    assert code == 0 and "verbatim" in out and "--no-samples" in out
    card = (tmp_path / "with" / "README.md").read_text()
    assert "held-out conversations verbatim" in card
    assert (tmp_path / "with" / "report.md").read_text().count("**Sample ") == report.count("**Sample ")

    code, out, _ = _push(capsys, model, tmp_path / "without", "--no-samples")
    staged = (tmp_path / "without" / "report.md").read_text()
    assert code == 0 and "verbatim" not in out
    assert "## Sample exchanges" not in staged and "**Sample " not in staged and "| reference |" not in staged
    assert "## Data" in staged and "## Final metrics" in staged  # the rest of the report stays
    assert "left out" in staged and "sample exchanges were left out" in (tmp_path / "without" / "README.md").read_text()
    assert (model / "report.md").read_text() == report  # the run's own report is untouched


# ---- case 20: an adapter's base ------------------------------------------------------------------------------

def _adapter_dir(model, tmp_path, base_in_config: str, base_in_yaml: str):
    d = tmp_path / "adapter"
    d.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
                 "results.json", "report.md"):
        if (model / name).exists():
            shutil.copy(model / name, d / name)
    shutil.copy(model / "model.safetensors", d / "adapter_model.safetensors")  # any safetensors will do here
    (d / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": base_in_config, "peft_type": "LORA",
                                                       "r": 8, "task_type": "CAUSAL_LM"}))
    cfg = yaml.safe_load((model / "chattune.yaml").read_text())
    cfg["model"]["name"], cfg["lora"] = base_in_yaml, {"enabled": True}
    (d / "chattune.yaml").write_text(yaml.safe_dump(cfg))
    (d / "README.md").write_text("---\nbase_model: x\nlibrary_name: peft\n---\n\n# Model Card for Model ID\n")
    return d


def test_a_pushed_adapter_with_a_local_base_says_so(model, tmp_path, capsys):
    base = tmp_path / "bases" / "my-gpt2"
    d = _adapter_dir(model, tmp_path, str(base), str(base))
    code, _, _ = _push(capsys, d, tmp_path / "up")
    assert code == 0
    staged = json.loads((tmp_path / "up" / "adapter_config.json").read_text())
    assert staged["base_model_name_or_path"] == "my-gpt2" and str(tmp_path) not in json.dumps(staged)
    card = (tmp_path / "up" / "README.md").read_text()
    assert "Model Card for Model ID" not in card and "base_model" not in yaml.safe_load(card.split("---")[1])
    assert "`my-gpt2` (a local model directory)" in card and "base_model_name_or_path" in card  # supply the base
    assert sorted(p.name for p in (tmp_path / "up").glob("README*")) == ["README.md"]


def test_a_pushed_adapter_with_a_hub_base_names_its_hub_id(model, tmp_path, capsys):
    d = _adapter_dir(model, tmp_path, "openai-community/gpt2", "openai-community/gpt2")
    code, _, _ = _push(capsys, d, tmp_path / "up")
    staged = json.loads((tmp_path / "up" / "adapter_config.json").read_text())
    assert code == 0 and staged["base_model_name_or_path"] == "openai-community/gpt2"
    card = (tmp_path / "up" / "README.md").read_text()
    assert yaml.safe_load(card.split("---")[1])["base_model"] == "openai-community/gpt2"
    assert "Model Card for Model ID" not in card
