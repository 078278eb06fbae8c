"""Models ready to train or to chat: a base model or an adapter directory, on the best device in a
suitable precision, with embeddings and generation config fitted to the chat template."""

from __future__ import annotations

import logging

import torch

from chattune.data.template import TemplateSetup, prepare_tokenizer
from chattune.errors import ChattuneError
from chattune.model.adapters import is_adapter_dir, load_adapter_model
from chattune.model.hub import load_pretrained, load_tokenizer
from chattune.model.manifest import check_complete

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


def context_length(config) -> int | None:
    cfg = config.get_text_config()
    for attr in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def resolve_max_length(requested: int | None, context: int | None, model_name: str) -> int:
    """The max length a run uses: as requested (within the context), else the model's context, at most 4096."""
    if requested is not None:
        if context is not None and requested > context:
            raise ChattuneError(f"--max-length {requested} is longer than {model_name}'s context of {context} tokens; "
                                f"use --max-length {context} or less")
        return requested
    if context is None:
        log.info("the model config states no context length; using max length 1024")
        return 1024
    if context > 4096:
        log.info(f"the model's context is {context} tokens; truncating conversations at 4096 (set --max-length)")
        return 4096
    return context


def load_model(name: str, revision: str | None = None, trust_remote_code: bool = False, dtype=None,
               quantization_config=None, merge_adapter: bool = True):
    """A model directory or hub id; a LoRA adapter directory (chattune train --lora) loads as its base
    model with the adapter applied: merged into a plain model, or as a PeftModel with merge_adapter=False."""
    if is_adapter_dir(name):
        return load_adapter_model(name, trust_remote_code, dtype=dtype, merge=merge_adapter)
    return load_pretrained(name, revision, trust_remote_code, dtype=dtype, quantization_config=quantization_config)


def check_model_complete(path, content: bool = True) -> None:
    """Refuse a chattune model directory whose final save did not finish (or whose files changed since), with
    one line naming the fix (model.manifest.check_complete); `content` also verifies checksums (reads every
    byte). Readers that hand a model on (export) call it with content; every load checks sizes
    (hub.check_model_source)."""
    check_complete(path, content=content)


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


def inference_dtype(device: str):
    """Half precision where a GPU has it (inference does not need fp32's range); fp32 elsewhere."""
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_prepared_base(name: str, seed: int, template_file: str | None = None, revision: str | None = None,
                       trust_remote_code: bool = False, dtype=None):
    """A model and tokenizer set up exactly as training sets up its base: the chat template (the model's,
    chattune's, or a file), added tokens and pad, and, seeded like the run, the same initial rows for added
    tokens, so a run's base model comes back exactly as its training began."""
    from transformers import set_seed

    tokenizer = load_tokenizer(name, revision, trust_remote_code)
    setup = prepare_tokenizer(tokenizer, template_file)
    set_seed(seed)
    model = load_model(name, revision, trust_remote_code, dtype=dtype)
    fit_model_to_tokenizer(model, tokenizer, setup)
    return model, tokenizer, setup


def to_device(model, device: str):
    try:
        return model.to(device).eval()
    except (RuntimeError, AssertionError) as e:
        raise ChattuneError(f"cannot use device {device!r}: {str(e).splitlines()[0]}") from e


def load_chat_model(path: str, device: str | None = None, trust_remote_code: bool = False, dtype=None,
                    revision: str | None = None):
    """Model and tokenizer ready to chat: a chattune output directory keeps its saved template; a
    model without a template (a base model such as gpt2) gets chattune's, exactly as training gives it."""
    device = device or pick_device()
    dtype = dtype or inference_dtype(device)
    tokenizer = load_tokenizer(path, revision, trust_remote_code)
    if tokenizer.chat_template:
        model = load_model(path, revision, trust_remote_code, dtype=dtype)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token  # only pads prompts, which the attention mask hides
    else:
        # seed 42: rows for added tokens are drawn at random, and a fixed seed keeps scores repeatable
        model, tokenizer, _ = load_prepared_base(path, 42, revision=revision, trust_remote_code=trust_remote_code,
                                                 dtype=dtype)
        log.info(f"{path} has no chat template; using chattune's (a model not fine-tuned with it will not chat well)")
    return to_device(model, device), tokenizer


def load_baseline(name: str, reference_tokenizer, device: str, seed: int = 42, template_file: str | None = None):
    """A model to compare against, set up as training set up its base model and given the reference's
    chat template, so both are scored on the same tokens."""
    model, tokenizer, _ = load_prepared_base(name, seed, template_file)
    tokenizer.chat_template = reference_tokenizer.chat_template
    return to_device(model, device), tokenizer
