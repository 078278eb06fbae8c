"""Training speed-ups that change nothing in what is learned, chosen per device.

Each one was measured with bench/train_speed.py; the README's Performance section has the figures.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch

from chattune.outputs import IGNORE_INDEX


def fuse_activations(model) -> int:
    """Swap GPT-2's `gelu_new` (seven elementwise passes) for the same tanh-approximated GELU in one kernel.

    The function is the same formula; outputs differ only by float rounding (~1e-7). The model's
    config is left alone, so the saved model is unchanged. Returns the number of modules swapped.
    """
    from transformers.activations import GELUTanh, NewGELUActivation

    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is NewGELUActivation:
                setattr(parent, name, GELUTanh())
                swapped += 1
    return swapped


def set_attention_dropout(model, p: float) -> int:
    """Set the attention-probability dropout of every attention layer (not the saved config).

    Any dropout on the attention probabilities sends PyTorch's SDPA on a CPU to its unfused path,
    which builds (batch, heads, length, length) score, probability and mask tensors in every layer:
    measured on the 4-layer d=256 GPT-2 at 4 x 1024 tokens, 0.8 GiB more peak memory and ~30% more
    time per step than with p = 0. Returns the number of layers changed.
    """
    changed = 0
    for module in model.modules():
        if isinstance(getattr(module, "attn_dropout", None), torch.nn.Dropout):  # gpt2, gpt-neo, ...
            module.attn_dropout.p = p
            changed += 1
        elif isinstance(getattr(module, "attention_dropout", None), float):  # llama, qwen, mistral, ...
            module.attention_dropout = p
            changed += 1
    return changed


def mask_is_redundant(attention_mask: torch.Tensor | None) -> bool:
    """True when every row is real tokens followed only by padding (or has no padding at all).

    A causal model never lets a token see later positions, so trailing padding cannot change any
    real token's output, and pad positions carry no loss: the mask can be dropped, which lets SDPA
    take its causal fast path (no dense mask, upper-triangle blocks skipped) instead of a masked one.
    """
    if attention_mask is None or attention_mask.dim() != 2:
        return False
    if attention_mask.shape[1] < 2:
        return True
    return bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())


def loss_inputs(model_inputs: dict, labels: torch.Tensor, causal: bool) -> dict:
    """The inputs for the model's forward with the selective head: drops a redundant attention mask."""
    if causal and "position_ids" not in model_inputs and mask_is_redundant(model_inputs.get("attention_mask")):
        # pad positions after the last real token must carry no loss for the drop to be exact
        mask = model_inputs["attention_mask"]
        if bool((labels[mask == 0] == IGNORE_INDEX).all()):
            model_inputs = {k: v for k, v in model_inputs.items() if k != "attention_mask"}
    return model_inputs


def cache_library_probes() -> None:
    """accelerate's optimizer wrapper asks importlib twice per optimizer step whether `lomo_optim` is installed
    (is_lomo_available: a find_spec walk over sys.path); the answer cannot change during a run."""
    import functools

    import accelerate.optimizer as wrapper

    if not hasattr(wrapper.is_lomo_available, "cache_info"):
        wrapper.is_lomo_available = functools.lru_cache(maxsize=None)(wrapper.is_lomo_available)


_UNPACKED_ROWS = contextvars.ContextVar("chattune_unpacked_rows", default=False)


@contextlib.contextmanager
def unpacked_rows():
    """Within: the forward's rows are one sequence each with the model's own positions (0, 1, 2, ...) and no
    attention mask, which the host knows from the collator. transformers then asks the device twice per forward
    what that already says (find_packed_sequence_indices: are positions restarting inside a row? and
    warn_if_padding_and_no_attention_mask: is a pad id at a row's end?); each answer read back makes the
    host wait for a GPU. With install_unpacked_shortcuts, both take the known answer (not packed; no warning)."""
    token = _UNPACKED_ROWS.set(True)
    try:
        yield
    finally:
        _UNPACKED_ROWS.reset(token)


def install_unpacked_shortcuts() -> None:
    """Patch the two checks once (they behave as before outside `unpacked_rows()`)."""
    import transformers.masking_utils as masking
    from transformers import PreTrainedModel

    if getattr(masking, "_chattune_unpacked", False) or not hasattr(masking, "find_packed_sequence_indices"):
        return
    find, warn = masking.find_packed_sequence_indices, PreTrainedModel.warn_if_padding_and_no_attention_mask

    def find_packed_sequence_indices(position_ids):
        return None if _UNPACKED_ROWS.get() else find(position_ids)

    def warn_if_padding_and_no_attention_mask(self, input_ids, attention_mask):
        if not _UNPACKED_ROWS.get():
            warn(self, input_ids, attention_mask)

    masking.find_packed_sequence_indices = find_packed_sequence_indices
    PreTrainedModel.warn_if_padding_and_no_attention_mask = warn_if_padding_and_no_attention_mask
    masking._chattune_unpacked = True


def is_causal_lm(model) -> bool:
    """Decoder-only causal language models (what chattune trains); encoder-decoders are not."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = base.config.get_text_config()
    return not getattr(cfg, "is_encoder_decoder", False)


def prepare_for_training(model, device: str) -> dict:
    """Apply the speed-ups that pay on `device`; returns what was done, for the run log."""
    cache_library_probes()
    done = {"fused_gelu_modules": fuse_activations(model)}
    if device == "cuda":
        # fp32 parts (layer norms, the loss) use TF32 tensor cores; bf16 autocast does the rest
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        done["tf32"] = True
    return done
