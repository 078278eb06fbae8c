"""Model stage: load a causal LM and its tokenizer (hub id or local directory), choose device and
precision, and fit the embeddings and generation config to the chat template."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from chattune.errors import ChattuneError
from chattune.template import TemplateSetup, prepare_tokenizer

log = logging.getLogger("chattune")


def pick_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_precision(requested: str, device: str) -> tuple[str, str | None]:
    """The precision to train in, and a note when the request cannot be honoured on this device.

    auto: bf16 on CUDA where supported, else fp16; fp32 on MPS and CPU (CPU half precision has no
    fast path on most machines and fp16 needs a CUDA grad scaler).
    """
    if device == "cuda":
        bf16_ok = torch.cuda.is_bf16_supported()
        if requested == "auto":
            return ("bf16" if bf16_ok else "fp16"), None
        if requested == "bf16" and not bf16_ok:
            return "fp16", "bf16 is not supported on this GPU; training in fp16"
        return requested, None
    if requested in ("auto", "fp32"):
        return "fp32", None
    if requested == "fp16":
        return "fp32", f"fp16 mixed precision needs a CUDA GPU; training in fp32 on {device}"
    if requested == "bf16" and device == "mps":
        return "fp32", "bf16 mixed precision is not used on MPS; training in fp32"
    return requested, None


def _is_local(name: str) -> bool:
    return Path(name).expanduser().exists() or name.startswith((".", "/", "~"))


def _hub_error(name: str, err: Exception, what: str) -> ChattuneError:
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    if _is_local(name):
        return ChattuneError(f"{what} not usable at {name}: {text}")
    return ChattuneError(f"could not load {what} '{name}' from the Hugging Face hub or its cache: {text}. "
                         "Check the name, your network (or HF_HUB_OFFLINE=1 with a filled cache), or give a local "
                         "directory.")


def check_model_source(name: str) -> None:
    p = Path(name).expanduser()
    if name.startswith((".", "/", "~")) and not p.exists():
        raise ChattuneError(f"model directory not found: {name}")
    if p.exists() and not p.is_dir():
        raise ChattuneError(f"--model must be a directory or a hub id, but {name} is a file")
    if p.is_dir() and not (p / "config.json").is_file() and not (p / "adapter_config.json").is_file():
        raise ChattuneError(f"{name} is not a model directory: it has no config.json")


def load_config(name: str, revision: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoConfig

    check_model_source(name)
    try:
        return AutoConfig.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise _hub_error(name, e, "model config") from e


def context_length(config) -> int | None:
    cfg = config.get_text_config()
    for attr in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def load_tokenizer(name: str, revision: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    check_model_source(name)
    try:
        return AutoTokenizer.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise _hub_error(name, e, "tokenizer") from e


def load_model(name: str, revision: str | None = None, trust_remote_code: bool = False, dtype=None,
               quantization_config=None, merge_adapter: bool = True):
    """Weights load as safetensors only (a pickled .bin can run code).

    A LoRA adapter directory (chattune train --lora) loads as its base model with the adapter
    applied: merged into a plain model, or as a PeftModel with merge_adapter=False.
    """
    from transformers import AutoModelForCausalLM

    from chattune.adapters import is_adapter_dir, load_adapter_model

    check_model_source(name)
    if is_adapter_dir(name):
        return load_adapter_model(name, trust_remote_code, dtype=dtype, merge=merge_adapter)
    extra = {"quantization_config": quantization_config} if quantization_config is not None else {}
    if quantization_config is not None:
        extra["device_map"] = {"": torch.cuda.current_device()}  # each process puts its 4-bit copy on its own GPU
    try:
        return AutoModelForCausalLM.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code,
                                                    use_safetensors=True, dtype=dtype or torch.float32, **extra)
    except Exception as e:
        if _is_local(name) and not any(Path(name).expanduser().glob("*.safetensors")):
            raise ChattuneError(f"{name} has no .safetensors weights; chattune loads only safetensors. Convert the "
                                "checkpoint with transformers (from_pretrained + save_pretrained) first.") from e
        raise _hub_error(name, e, "model") from e


def fit_model_to_tokenizer(model, tokenizer, setup: TemplateSetup) -> None:
    """Grow the embeddings for added tokens, and make the end-of-turn token stop generation."""
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        # new rows start at the mean embedding, so the added tokens begin as 'average' tokens
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    eot = tokenizer.convert_tokens_to_ids(setup.end_of_turn)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = eot
    gen = model.generation_config
    if setup.source == "chattune" or gen.eos_token_id is None:
        gen.eos_token_id = eot
    gen.pad_token_id = tokenizer.pad_token_id
    if gen.bos_token_id is None and tokenizer.bos_token_id is not None:
        gen.bos_token_id = tokenizer.bos_token_id


def load_for_training(model_cfg, log_fn=log.info):
    """Tokenizer ready for chat (template, pad) and the model fitted to it."""
    tokenizer = load_tokenizer(model_cfg.name, model_cfg.revision, model_cfg.trust_remote_code)
    setup = prepare_tokenizer(tokenizer, model_cfg.chat_template)
    log_fn(f"chat template: {setup.source}; end of turn {setup.end_of_turn!r}; pad {setup.pad_token!r}"
           + (f"; added tokens {setup.added_tokens}" if setup.added_tokens else ""))
    return tokenizer, setup
