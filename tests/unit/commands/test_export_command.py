"""`chattune export` through the CLI's main() in this process: bad input stops with one line and exit 2 before
any weights load, existing files are kept unless --overwrite, and a LoRA adapter directory is exported merged.
The real CLI and llama.cpp run the files in tests/integration/test_export_llama_cpp.py."""

from __future__ import annotations

import subprocess
import sys

import gguf
import numpy as np
import pytest

from chattune.artifacts.gguf import DTYPES
from chattune.cli import main
from chattune.commands import export


def run(capsys, *args) -> tuple[int, str, str]:
    code = main(["export", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(capsys, *args, match: str) -> str:
    code, out, err = run(capsys, *args)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert match in lines[0], lines[0]
    return lines[0]


def test_bad_input_stops_with_one_line(capsys, trained_dir, tmp_path):
    from transformers import AutoConfig

    out = tmp_path / "out"
    one_line_error(capsys, tmp_path / "nowhere", "--output-dir", out, match="model directory not found")
    (tmp_path / "empty").mkdir()
    one_line_error(capsys, tmp_path / "empty", "--output-dir", out, match="is not a model directory")
    gptj = tmp_path / "gptj"
    AutoConfig.for_model("gptj", n_embd=32, n_layer=1, n_head=2, rotary_dim=8,
                         architectures=["GPTJForCausalLM"]).save_pretrained(gptj)
    # refused from config.json alone: the directory holds no weights or tokenizer to load
    one_line_error(capsys, gptj, "--output-dir", out, match="GGUF export supports gpt2, llama, qwen2 models; "
                                                             f"{gptj} (GPTJForCausalLM) is 'gptj'")
    one_line_error(capsys, trained_dir, "--output-dir", out, "--system", "hi",
                   match="--system is for --format ollama")
    one_line_error(capsys, trained_dir, "--output-dir", out, "--name", "../x", match="--name '../x'")
    assert not out.exists()  # nothing was created for a refused export


def test_unwritable_output_dir_stops_with_one_line(capsys, trained_dir, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    one_line_error(capsys, trained_dir, "--output-dir", blocker, match=f"cannot write to --output-dir {blocker}")
    one_line_error(capsys, trained_dir, "--output-dir", blocker / "sub", match="cannot write to --output-dir")


@pytest.mark.skipif(sys.platform == "win32" or __import__("os").geteuid() == 0,
                    reason="root (or Windows) can write to a read-only directory")
def test_read_only_output_dir_stops_with_one_line(capsys, trained_dir, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    one_line_error(capsys, trained_dir, "--output-dir", locked, match="cannot write to --output-dir")


def test_existing_files_are_kept_unless_overwrite(capsys, trained_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "Modelfile").write_text("mine")
    one_line_error(capsys, trained_dir, "--format", "ollama", "--output-dir", out, "--dtype", "f32",
                   match=f"{out / 'Modelfile'} already exists; pass --overwrite")
    assert (out / "Modelfile").read_text() == "mine" and sorted(p.name for p in out.iterdir()) == ["Modelfile"]
    code, stdout, _ = run(capsys, trained_dir, "--format", "ollama", "--output-dir", out, "--dtype", "f32",
                          "--overwrite")
    assert code == 0
    name = export.default_name(trained_dir)  # the directory's name: "out"
    assert (out / f"{name}-f32.gguf").is_file() and (out / "Modelfile").read_text().startswith(
        f"FROM ./{name}-f32.gguf\n")
    assert f"ollama create {name} -f {out / 'Modelfile'}" in stdout
    assert f"llama-cli -m {out / f'{name}-f32.gguf'}" in stdout and "lms import" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", f"{name}-f32.gguf"]  # no temporary files left


def test_adapter_directory_is_exported_merged(capsys, trained_dir, tmp_path):
    """A LoRA adapter directory (base: the trained model) is merged in memory, and its merged weights written."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(trained_dir)
    original = base.transformer.h[0].attn.c_attn.weight.detach().numpy().T.copy()
    lora = get_peft_model(base, LoraConfig(target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False,
                                           base_model_name_or_path=str(trained_dir)))
    adapter = tmp_path / "adapter"
    lora.save_pretrained(adapter)
    AutoTokenizer.from_pretrained(trained_dir).save_pretrained(adapter)
    merged = lora.merge_and_unload().transformer.h[0].attn.c_attn.weight.detach().numpy().T
    code, stdout, _ = run(capsys, adapter, "--output-dir", tmp_path / "out", "--dtype", "f32", "--name", "lora")
    assert code == 0 and "rerun with --format ollama" in stdout
    tensors = {t.name: t for t in gguf.GGUFReader(tmp_path / "out" / "lora-f32.gguf").tensors}
    np.testing.assert_allclose(np.asarray(tensors["blk.0.attn_qkv.weight"].data).reshape(merged.shape), merged,
                               atol=1e-6)
    assert not np.allclose(merged, original, atol=1e-4)  # the adapter changed the weights that were written


def test_default_names_and_dtypes():
    from pathlib import Path

    assert export.default_name(Path("/runs/My Run")) == "my-run"
    assert export.default_name(Path("/runs/addition/merged")) == "addition-merged"
    assert set(export.DTYPE_CHOICES) == set(DTYPES)


def test_export_help_does_not_import_the_heavy_libraries():
    code = ("import sys; from chattune.cli import build_parser; build_parser('export'); "
            "print(sorted(m for m in ('torch', 'transformers', 'gguf', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
