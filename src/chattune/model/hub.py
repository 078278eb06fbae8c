"""Reading a model from a hub id or a local directory: its config, tokenizer and weights.

Weights load as safetensors only and modelling code shipped with a model runs only when asked
(trust_remote_code); every failure becomes one line that says whether the name or the network is at fault.
"""

from __future__ import annotations

from pathlib import Path

import torch

from chattune.errors import ChattuneError
from chattune.model.manifest import check_complete
from chattune.outputs import ADAPTER_CONFIG_FILE, MODEL_CONFIG_FILE


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
    if p.is_dir():
        check_complete(p)  # a chattune run whose final save did not finish: one line naming the fix
    if p.is_dir() and not (p / MODEL_CONFIG_FILE).is_file() and not (p / ADAPTER_CONFIG_FILE).is_file():
        raise ChattuneError(f"{name} is not a model directory: it has no config.json")


def load_config(name: str, revision: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoConfig

    check_model_source(name)
    try:
        return AutoConfig.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise _hub_error(name, e, "model config") from e


def load_tokenizer(name: str, revision: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    check_model_source(name)
    try:
        return AutoTokenizer.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise _hub_error(name, e, "tokenizer") from e


def load_pretrained(name: str, revision: str | None = None, trust_remote_code: bool = False, dtype=None,
                    quantization_config=None):
    """A causal LM's weights, as safetensors only (a pickled .bin can run code)."""
    from transformers import AutoModelForCausalLM

    check_model_source(name)
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
