"""Export a causal LM to one GGUF file, the format llama.cpp, Ollama and LM Studio load: the weights in
llama.cpp's layout, the hyper-parameters its graph for the architecture reads, the context length, and the
tokenizer with its chat template (gguf_vocab.py).

The file is written by the `gguf` package, the reference writer the llama.cpp project publishes, with its
tensor-name maps. llama.cpp's convert_hf_to_gguf.py is not used: it is a script, not a library, and it refuses
every tokenizer whose pre-tokenizer hash it does not know, which is every tokenizer chattune trains.
Files are written atomically (a temporary file renamed into place), so a runtime never loads half a file.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import gguf
import numpy as np

from chattune.artifacts.gguf_vocab import add_vocab
from chattune.errors import ChattuneError

# transformers model_type -> llama.cpp architecture (each checked against llama.cpp itself by the tests)
ARCHS = {"gpt2": gguf.MODEL_ARCH.GPT2, "llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}
DTYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
# buffers some transformers versions keep in state_dict(); llama.cpp computes them itself
_SKIP_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")


def check_architecture(model_type: str | None, what: str = "this model") -> None:
    if model_type not in ARCHS:
        raise ChattuneError(f"GGUF export supports {', '.join(ARCHS)} models; {what} is {model_type!r}, which "
                            "chattune cannot export for llama.cpp")


def context_length(config) -> int:
    n = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    if not n:
        raise ChattuneError("GGUF export: the model config states no context length (n_positions or "
                            "max_position_embeddings)")
    return int(n)


def _check(ok: bool, arch: str, what: str) -> None:
    if not ok:
        raise ChattuneError(f"GGUF export: this {arch} model uses {what}, which llama.cpp's {arch} does not run")


def _add_hparams(writer: gguf.GGUFWriter, config, model_type: str) -> None:
    writer.add_context_length(context_length(config))
    writer.add_block_count(config.num_hidden_layers)
    writer.add_embedding_length(config.hidden_size)
    writer.add_head_count(config.num_attention_heads)
    if model_type == "gpt2":
        # llama.cpp's GPT-2 graph: ggml_gelu (the tanh form) and plain 1/sqrt(head_dim) attention scaling
        _check(config.activation_function in ("gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh"), model_type,
               f"activation {config.activation_function!r}")
        _check(config.scale_attn_weights and not config.scale_attn_by_inverse_layer_idx, model_type,
               "non-standard attention scaling")
        writer.add_feed_forward_length(config.n_inner or 4 * config.n_embd)
        writer.add_layer_norm_eps(config.layer_norm_epsilon)
        return
    _check(config.hidden_act == "silu", model_type, f"activation {config.hidden_act!r}")
    # transformers 5 keeps rope_theta and any scaling in rope_parameters; older versions in two attributes
    rope = getattr(config, "rope_parameters", None) or {"rope_theta": getattr(config, "rope_theta", 10000.0),
                                                         **(getattr(config, "rope_scaling", None) or {})}
    _check(rope.get("rope_type", rope.get("type", "default")) == "default", model_type, "RoPE scaling")
    _check(not getattr(config, "use_sliding_window", False), model_type, "sliding-window attention")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)


def _rope_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """transformers' Llama rotates the two halves of each head, llama.cpp's LLAMA rope adjacent pairs: q/k rows
    (and biases) are interleaved per head, as llama.cpp's converter does. Qwen2 (NEOX rope) needs nothing."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensors(model, model_type: str):
    """(gguf name, float32 array in llama.cpp's layout) for every weight; a tied LM head is left out (llama.cpp's
    GPT-2, Llama and Qwen2 loaders use token_embd when output.weight is absent)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    config = model.config
    name_map = gguf.get_tensor_name_map(ARCHS[model_type], config.num_hidden_layers)
    embed_ptr = model.get_input_embeddings().weight.data_ptr()
    for name, tensor in model.state_dict().items():
        if name.endswith(_SKIP_SUFFIXES):
            continue
        new = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise ChattuneError(f"GGUF export: llama.cpp's {model_type} has no tensor for {name!r}; this variant of "
                                f"{model_type} is not supported")
        if new == "output.weight" and tensor.data_ptr() == embed_ptr:
            continue
        data = tensor.detach().to(torch.float32).cpu().numpy()
        # GPT-2's Conv1D stores weights as [in, out]; GGUF wants nn.Linear's [out, in]
        if name.endswith(".weight") and isinstance(model.get_submodule(name.rsplit(".", 1)[0]), Conv1D):
            data = data.T
        if model_type == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
            data = _rope_permute(data, config.num_attention_heads)
        elif model_type == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
            data = _rope_permute(data, config.num_key_value_heads or config.num_attention_heads)
        yield new, np.ascontiguousarray(data)


def encode(name: str, data: np.ndarray, dtype: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """llama.cpp's converter's rule: 1-D tensors (norms, biases) and the position embedding stay f32; other
    weights become f16, or q8_0 when their rows split into whole 32-value blocks (else f16)."""
    keep_f32 = data.ndim < 2 or not name.endswith(".weight") or name.startswith("position_embd")
    if dtype == "f32" or keep_f32:
        return data.astype(np.float32), gguf.GGMLQuantizationType.F32
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]
    if dtype == "q8_0" and data.shape[-1] % block == 0:
        return gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    return data.astype(np.float16), gguf.GGMLQuantizationType.F16


def prepare_output_dir(directory: str | Path) -> Path:
    """Create the output directory and prove it writable, before any slow work."""
    directory = Path(directory).expanduser()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".chattune-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ChattuneError(f"cannot write to --output-dir {directory}: {e.strerror or e}; choose a directory you "
                            "can write to") from None
    return directory


def refuse_existing(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise ChattuneError(f"{path} already exists; pass --overwrite to replace it, or choose another --output-dir "
                            "or --name")


@contextlib.contextmanager
def atomic_output(path: str | Path, overwrite: bool = False):
    """Yield a temporary path beside `path`; once the block has written it, it is synced and renamed onto
    `path`. On any error the temporary file is removed and `path` is left as it was."""
    path = Path(path)
    refuse_existing(path, overwrite)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        refuse_existing(path, overwrite)  # created by someone else while this was being written
        os.replace(tmp, path)
    except OSError as e:
        raise ChattuneError(f"writing {path} failed: {e.strerror or e}") from e
    finally:
        tmp.unlink(missing_ok=True)


def write_gguf(model, tokenizer, path: str | Path, dtype: str = "f16", name: str | None = None,
               overwrite: bool = False) -> Path:
    """Write `model` (a transformers causal LM, any LoRA adapter merged) and its tokenizer to one GGUF file."""
    if dtype not in DTYPES:
        raise ChattuneError(f"--dtype {dtype!r} is not a GGUF export type; choose one of {', '.join(DTYPES)}")
    if hasattr(model, "peft_config"):  # a PeftModel's weights are split into base and adapter
        raise ChattuneError("GGUF export needs the LoRA adapter merged into the model first (merge_and_unload)")
    model_type = model.config.model_type
    check_architecture(model_type, type(model).__name__)
    path = Path(path)
    n_vocab = model.get_input_embeddings().weight.shape[0]
    with atomic_output(path, overwrite) as tmp:
        writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[ARCHS[model_type]])
        try:
            writer.add_name(name or path.stem)
            writer.add_file_type(DTYPES[dtype])
            if dtype == "q8_0":
                writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            writer.add_vocab_size(n_vocab)
            _add_hparams(writer, model.config, model_type)
            add_vocab(writer, model, tokenizer, n_vocab)
            for new, data in _tensors(model, model_type):
                encoded, qtype = encode(new, data, dtype)
                writer.add_tensor(new, encoded, raw_dtype=qtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    return path
