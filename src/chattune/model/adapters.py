"""LoRA and QLoRA adapters through PEFT: per-architecture defaults, added tokens kept trainable,
an adapter directory loaded as a model, and merging it into a standalone model directory.

Tokens chattune adds to the vocabulary (gpt2 gets <|im_start|>/<|im_end|>) start as untrained
rows; LoRA alone would leave them so, and the model could never learn to end a turn. Their rows
are trained with PEFT's trainable tokens (on the embedding and, through PEFT's tie handling or
explicitly, the LM head) and saved in the adapter, a few kilobytes instead of the whole matrix.
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
from pathlib import Path

import torch

from chattune.errors import ChattuneError
from chattune.model.hub import check_model_source, load_pretrained, load_tokenizer
from chattune.outputs import (
    ADAPTER_CONFIG_FILE,
    CONFIG_FILE,
    GENERATION_CONFIG_FILE,
    MERGED_FROM_FILE,
    MODEL_CONFIG_FILE,
)

log = logging.getLogger("chattune")

# GPT-2 keeps its projections in Conv1D layers (weights stored transposed: fan_in_fan_out)
ARCH_TARGETS = {"gpt2": ["c_attn", "c_proj", "c_fc"]}


def is_adapter_dir(path) -> bool:
    p = Path(str(path)).expanduser()
    return p.is_dir() and (p / ADAPTER_CONFIG_FILE).is_file() and not (p / MODEL_CONFIG_FILE).is_file()


def check_qlora_available() -> None:
    """Fail before any data or weights are loaded when 4-bit training cannot run here."""
    if not torch.cuda.is_available():
        raise ChattuneError("--qlora needs a CUDA GPU (bitsandbytes 4-bit weights) and none is available here; use "
                            "--lora to train an adapter on the full-precision model instead")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ChattuneError("--qlora needs bitsandbytes: pip install 'chattune[qlora]' (or pip install "
                            "bitsandbytes)") from None


def quantization_config():
    """QLoRA's recipe: NF4 weights, double quantization, compute in bf16 where the GPU has it."""
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute)


def new_token_ids(tokenizer, added_tokens: list[str], rows_before: int) -> list[int]:
    """Rows that hold no trained embedding: the added tokens and any row the resize appended."""
    ids = {tokenizer.convert_tokens_to_ids(t) for t in added_tokens}
    ids |= set(range(rows_before, len(tokenizer)))
    return sorted(ids)


def _module_name(model, module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def default_targets(model) -> list[str] | str:
    return ARCH_TARGETS.get(model.config.model_type, "all-linear")


def lora_config(model, settings, token_ids: list[int], base_name: str, revision: str | None):
    """A peft.LoraConfig for `model` from chattune's lora settings."""
    from peft import LoraConfig
    from transformers.pytorch_utils import Conv1D

    targets = settings.target_modules or default_targets(model)
    if isinstance(targets, list) and targets == ["all-linear"]:
        targets = "all-linear"
    def matches(name: str) -> bool:  # PEFT's rule for a list: the module name or a dotted suffix of it
        return any(name == t or name.endswith("." + t) for t in targets)

    if isinstance(targets, list):
        found = [n for n, _ in model.named_modules() if matches(n)]
        missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in found)]
        if missing:
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                             if isinstance(m, (torch.nn.Linear, Conv1D))})
            raise ChattuneError(f"--lora-target-modules: {', '.join(missing)} not found in {base_name}; its linear "
                                f"layers are: {', '.join(linear)} (or use all-linear)")
    conv1d = isinstance(targets, list) and any(isinstance(m, Conv1D) for n, m in model.named_modules() if matches(n))
    trainable_tokens = None
    if token_ids:
        emb_in, emb_out = model.get_input_embeddings(), model.get_output_embeddings()
        trainable_tokens = {_module_name(model, emb_in): token_ids}
        tied = emb_out is not None and emb_out.weight is emb_in.weight
        if emb_out is not None and not tied:  # PEFT covers a tied head itself; an untied one needs its rows too
            trainable_tokens[_module_name(model, emb_out)] = token_ids
    if Path(base_name).expanduser().exists():
        base_name = str(Path(base_name).expanduser().resolve())  # the adapter must find its base from anywhere
    return LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      target_modules=targets, fan_in_fan_out=conv1d, task_type="CAUSAL_LM", bias="none",
                      trainable_token_indices=trainable_tokens, base_model_name_or_path=base_name,
                      revision=revision)


def wrap(model, settings, token_ids: list[int], base_name: str, revision: str | None, args):
    """The model as a PeftModel ready to train (QLoRA: prepared for k-bit training first)."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    config = lora_config(model, settings, token_ids, base_name, revision)
    model.name_or_path = config.base_model_name_or_path  # PEFT records the base under this name
    if settings.qlora:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.gradient_checkpointing)
    kwargs = {}
    plugin = getattr(args, "deepspeed_plugin", None)
    if plugin is not None and plugin.zero_stage == 3 and not settings.qlora:
        kwargs["autocast_adapter_dtype"] = False  # ZeRO-3 gathers parameters of one dtype (as TRL does)
    try:
        peft_model = get_peft_model(model, config, **kwargs)
    except ValueError as e:
        raise ChattuneError(f"LoRA could not be applied to {base_name}: {e}") from e
    if token_ids:
        # PEFT's "auto" would also save the whole resized embedding; the trainable-token rows are all that changed
        peft_model.save_pretrained = functools.partial(type(peft_model).save_pretrained, peft_model,
                                                       save_embedding_layers=False)
    trainable, total = peft_model.get_nb_trainable_parameters()
    target_txt = config.target_modules if isinstance(config.target_modules, str) else ",".join(
        sorted(config.target_modules))
    log.info(f"{'QLoRA' if settings.qlora else 'LoRA'} r={settings.r} alpha={settings.alpha} on {target_txt}"
             + (f", {len(token_ids)} added token row(s) trained" if token_ids else "")
             + f": {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%)")
    return peft_model


def save_extras(model, out: Path) -> None:
    """Beside the adapter: the generation config (eos = end of turn) that chat and eval read."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.generation_config.save_pretrained(str(out))


def load_adapter_model(path, trust_remote_code: bool = False, dtype=None, merge: bool = True):
    """An adapter directory as a model: its base, grown to the adapter's vocabulary, with the adapter
    applied; merged into a plain transformers model unless `merge` is False (then a PeftModel)."""
    from peft import PeftConfig, PeftModel
    from transformers import GenerationConfig

    path = Path(str(path)).expanduser()
    check_model_source(str(path))  # an adapter whose final save did not finish: one line, before the base loads
    config = PeftConfig.from_pretrained(str(path))
    base_name = config.base_model_name_or_path
    if not base_name:
        raise ChattuneError(f"{path / ADAPTER_CONFIG_FILE} names no base model (base_model_name_or_path)")
    if base_name.startswith(("/", ".", "~")) and not Path(base_name).expanduser().exists():
        raise ChattuneError(f"the adapter in {path} needs its base model {base_name}, which is not there; restore it, "
                            f"or set base_model_name_or_path in {path / ADAPTER_CONFIG_FILE}")
    base = load_pretrained(base_name, config.revision, trust_remote_code, dtype=dtype)
    tokenizer = load_tokenizer(str(path))
    if len(tokenizer) > base.get_input_embeddings().weight.shape[0]:
        # the rows of added tokens come from the adapter (trainable tokens); only the shape matters here
        base.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    try:
        model = PeftModel.from_pretrained(base, str(path), is_trainable=False)
    except (RuntimeError, ValueError) as e:
        raise ChattuneError(f"the adapter in {path} does not fit its base model {base_name}: "
                            f"{str(e).splitlines()[0]}") from e
    if merge:
        model = model.merge_and_unload()
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    if (path / GENERATION_CONFIG_FILE).is_file():
        target.generation_config = GenerationConfig.from_pretrained(str(path))
    target.config.pad_token_id = tokenizer.pad_token_id
    if target.generation_config.eos_token_id is not None:
        target.config.eos_token_id = target.generation_config.eos_token_id
    return model


def merge_adapter(adapter_dir, output_dir, overwrite: bool = False, trust_remote_code: bool = False) -> Path:
    """Write the adapter merged into its base as a standalone model directory (safetensors)."""
    adapter_dir, out = Path(str(adapter_dir)).expanduser(), Path(str(output_dir)).expanduser()
    if not is_adapter_dir(adapter_dir):
        raise ChattuneError(f"{adapter_dir} is not an adapter directory: it has no {ADAPTER_CONFIG_FILE} (a full model "
                            "needs no merging)")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ChattuneError(f"{out} is not empty; choose a new --output-dir")
        shutil.rmtree(out)  # only chattune's own OUTPUT/merged is overwritten: no stale shards may remain
    # merge in fp32, then store in the base model's own dtype
    model = load_adapter_model(adapter_dir, trust_remote_code, dtype=torch.float32, merge=True)
    stored = getattr(model.config, "dtype", None) or getattr(model.config, "torch_dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    if isinstance(stored, torch.dtype) and stored != torch.float32:
        model = model.to(stored)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    load_tokenizer(str(adapter_dir)).save_pretrained(str(out))
    if (adapter_dir / CONFIG_FILE).is_file():
        shutil.copy2(adapter_dir / CONFIG_FILE, out / CONFIG_FILE)
    (out / MERGED_FROM_FILE).write_text(json.dumps({"adapter": str(adapter_dir.resolve()),
                                                      "base": model.config._name_or_path}, indent=2))
    return out
