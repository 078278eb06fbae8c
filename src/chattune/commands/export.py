"""`chattune export`: the model as one GGUF file for llama.cpp, LM Studio and Ollama (`--format ollama` adds a
Modelfile). A LoRA adapter directory is merged into its base model in memory first; nothing else is changed.

Everything that can be checked cheaply (the model directory, its architecture, its tokenizer, the output
files and directory) is checked before the weights are loaded, each failure one line.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from chattune.commands import default
from chattune.errors import ChattuneError
from chattune.outputs import ADAPTER_CONFIG_FILE, MERGED_DIR
from chattune.verbosity import quiet_libraries

FORMATS = ("gguf", "ollama")
# the keys of chattune.artifacts.gguf.DTYPES (a test holds them equal): --help must not import the writer
DTYPE_CHOICES = ("f32", "f16", "q8_0")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def add_arguments(p) -> None:
    p.add_argument("model", metavar="MODEL", help="a chattune output directory, a LoRA adapter directory (merged in "
                                                  "memory first) or any local model directory")
    p.add_argument("--format", choices=FORMATS, default=default(run_export, "fmt"),
                   help="gguf: one .gguf file (llama.cpp, LM Studio); ollama: the .gguf and a Modelfile "
                        "(default: %(default)s)")
    p.add_argument("--output-dir", required=True, metavar="DIR", help="where to write NAME-DTYPE.gguf (and Modelfile)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default=default(run_export, "dtype"),
                   help="weights: f32 (exact), f16 (half the size), q8_0 (8-bit, about a quarter); norms and "
                        "biases stay f32 (default: %(default)s)")
    p.add_argument("--name", help="the model's name: the file is NAME-DTYPE.gguf, and `ollama create NAME` "
                                  "(default: the model directory's name)")
    p.add_argument("--system", metavar="TEXT", help="with --format ollama: the Modelfile's SYSTEM prompt (default: "
                                                    "none, as chattune runs have no fixed system prompt)")
    p.add_argument("--overwrite", action="store_true", help="replace files of the same name in --output-dir")


def run(args) -> int:
    with quiet_libraries():  # loading a model takes a second; its bar would only clutter the summary
        r = run_export(args.model, args.output_dir, fmt=args.format, dtype=args.dtype, name=args.name,
                       system=args.system, overwrite=args.overwrite)
    print("\n".join(summary(r)))
    return 0


def default_name(model_dir: Path) -> str:
    """The model directory's name, as a file and Ollama model name (chattune's OUTPUT/merged: OUTPUT-merged)."""
    path = model_dir.resolve()
    base = f"{path.parent.name}-{path.name}" if path.name == MERGED_DIR else path.name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-._").lower() or "model"


def _model_dir(model: str) -> Path:
    from chattune.model.hub import check_model_source

    path = Path(model).expanduser()
    if not path.exists():
        raise ChattuneError(f"model directory not found: {model} (export takes a local directory: a chattune output, "
                            "a LoRA adapter or a saved model)")
    if not path.is_dir():
        raise ChattuneError(f"{model} is a file, not a model directory")
    check_model_source(str(path))  # one line when there is no config.json / adapter_config.json
    return path


def _model_config(path: Path):
    """The model's config without loading weights; for an adapter, its base model's."""
    from chattune.model.adapters import is_adapter_dir
    from chattune.model.hub import load_config

    if not is_adapter_dir(path):
        return load_config(str(path))
    from chattune.artifacts.card import adapter_base

    base = adapter_base(path)
    if not base:
        raise ChattuneError(f"{path / ADAPTER_CONFIG_FILE} names no base model (base_model_name_or_path)")
    return load_config(base)


def run_export(model: str, output_dir: str, fmt: str = "gguf", dtype: str = "f16", name: str | None = None,
               system: str | None = None, overwrite: bool = False) -> dict:
    """Write OUTPUT_DIR/NAME-DTYPE.gguf (and OUTPUT_DIR/Modelfile for fmt="ollama"); returns what was written."""
    import torch

    from chattune.artifacts.gguf import (
        DTYPES,
        check_architecture,
        context_length,
        prepare_output_dir,
        refuse_existing,
        write_gguf,
    )
    from chattune.artifacts.gguf_vocab import end_of_turn_id, llama_cpp_pretokenizer
    from chattune.artifacts.ollama import MODELFILE, ollama_modelfile, write_modelfile
    from chattune.model.hub import load_tokenizer
    from chattune.model.load import check_model_complete, load_model

    if fmt not in FORMATS:
        raise ChattuneError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise ChattuneError(f"--dtype {dtype!r} is not a GGUF export type; choose one of {', '.join(DTYPES)}")
    if system and fmt != "ollama":
        raise ChattuneError("--system is for --format ollama: a GGUF file holds no system prompt (llama.cpp takes "
                            "one with --system-prompt)")
    if name is not None and not _NAME.fullmatch(name):
        raise ChattuneError(f"--name {name!r}: use letters, digits, '.', '_' and '-' (starting with a letter or "
                            "digit, at most 100)")
    src = _model_dir(model)
    check_model_complete(src)  # a run whose final save did not finish must not be handed on
    config = _model_config(src)
    archs = ", ".join(config.architectures or [])
    check_architecture(config.model_type, f"{model} ({archs})" if archs else model)
    name = name or default_name(src)
    out = Path(output_dir).expanduser()
    gguf_path, modelfile_path = out / f"{name}-{dtype}.gguf", out / MODELFILE
    for path in (gguf_path, modelfile_path) if fmt == "ollama" else (gguf_path,):
        refuse_existing(path, overwrite)
    tokenizer = load_tokenizer(str(src))
    llama_cpp_pretokenizer(tokenizer)  # an unsupported tokenizer stops before the weights load
    modelfile = (ollama_modelfile(gguf_path.name, tokenizer, context_length(config), system)
                 if fmt == "ollama" else None)
    prepare_output_dir(out)
    loaded = load_model(str(src), dtype=torch.float32)  # an adapter comes back merged into its base
    write_gguf(loaded, tokenizer, gguf_path, dtype, name=name, overwrite=overwrite)
    if modelfile is not None:
        write_modelfile(modelfile_path, modelfile, overwrite)
    eot = end_of_turn_id(loaded, tokenizer)
    return {"gguf": str(gguf_path), "modelfile": str(modelfile_path) if modelfile else None, "name": name,
            "dtype": dtype, "architecture": config.model_type, "context": context_length(config),
            "end_of_turn": tokenizer.convert_ids_to_tokens(eot), "chat_template": bool(tokenizer.chat_template),
            "bytes": gguf_path.stat().st_size}


def summary(r: dict) -> list[str]:
    """What was written, and how to run it in each runtime."""
    gguf, q = r["gguf"], shlex.quote
    lines = [f"wrote {gguf} ({r['bytes'] / 1e6:.1f} MB: {r['architecture']}, {r['dtype']}, context "
             f"{r['context']} tokens, end of turn {r['end_of_turn']})"]
    if not r["chat_template"]:
        lines.append("note: the model has no chat template, so the file has none; runtimes will fall back to "
                     "their own, which this model was not trained on")
    if r["modelfile"]:
        lines.append(f"wrote {r['modelfile']}")
    lines += [f"llama.cpp:  llama-cli -m {q(gguf)}   (an OpenAI-style server: llama-server -m {q(gguf)})",
              f"Python:     llama_cpp.Llama(model_path={gguf!r}).create_chat_completion(messages=[...])",
              f"LM Studio:  lms import {q(gguf)}"]
    if r["modelfile"]:
        lines.append(f"Ollama:     ollama create {r['name']} -f {q(r['modelfile'])} && ollama run {r['name']}")
    else:
        lines.append("Ollama:     rerun with --format ollama for a Modelfile")
    return lines
