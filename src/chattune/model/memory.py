"""A training-memory estimate printed before the first step, so an out-of-memory error is seen coming.

Per process, before any sharding (FSDP and ZeRO divide the weight, gradient and optimizer parts):
weights as stored; fp32 gradients and AdamW's two fp32 moments for the trainable parameters; and
the activations a decoder transformer keeps for backward. Those were measured on GPT-2 blocks with
saved-tensor hooks: about 120 bytes per token and hidden unit per layer in fp32 (88 under
autocast), plus the attention probabilities with eager attention; with gradient checkpointing, one
fp32 hidden vector per layer and token plus one layer recomputed at a time. The loss head adds
its logits: every position x vocabulary for a full head, one chunk of rows at a time for
chattune's selective head (which also builds the head's gradient during the forward pass).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from chattune.model.loss import chunk_rows_for

log = logging.getLogger("chattune")

GiB = 1024 ** 3
PER_LAYER_FP32 = 120  # bytes per token and hidden unit kept by one decoder layer in fp32
PER_LAYER_MIXED = 88  # the same under bf16/fp16 autocast (norms and residuals stay fp32)


@dataclass
class MemoryEstimate:
    total_params: int
    trainable_params: int
    weights: int
    gradients: int
    optimizer: int
    activations: int
    available: int | None
    where: str
    batch: int
    length: int
    checkpointing: bool

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations

    def summary(self) -> str:
        def g(n):
            return f"{n / GiB:.2f} GiB"

        avail = f"; {g(self.available)} available on {self.where}" if self.available else ""
        return (f"memory estimate per process: {_n(self.total_params)} parameters "
                f"({_n(self.trainable_params)} trainable); weights {g(self.weights)}, gradients "
                f"{g(self.gradients)}, AdamW state {g(self.optimizer)}, activations {g(self.activations)} at batch "
                f"{self.batch} x {self.length} tokens (gradient checkpointing "
                f"{'on' if self.checkpointing else 'off'}); total about {g(self.total)}{avail}")


def _n(count: int) -> str:
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= size:
            return f"{count / size:.1f}{unit}"
    return str(count)


def _unique_params(model):
    seen = set()
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            yield p


def _count(p) -> int:
    # bitsandbytes stores two 4-bit values per uint8 element
    return p.numel() * 2 if p.dtype == torch.uint8 and hasattr(p, "quant_state") else p.numel()


def activation_bytes(config, batch: int, length: int, element_bytes: int, checkpointing: bool, eager: bool,
                     selective_head: bool, device: str = "cpu") -> int:
    """Bytes of activations kept for backward in one forward pass of a decoder transformer."""
    cfg = config.get_text_config()
    # GPT-2's config names these n_embd, n_layer and n_head; transformers maps the common names onto them
    hidden, layers, heads = cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads
    tokens = batch * length
    # measured on GPT-2 blocks (saved-tensor hooks): ~30 fp32 values per hidden unit, fewer under autocast
    per_token = hidden * (PER_LAYER_FP32 if element_bytes == 4 else PER_LAYER_MIXED)
    if eager:
        per_token += 2 * heads * length * element_bytes  # attention probabilities and their softmax input
    layer = tokens * per_token
    # checkpointing keeps each layer's fp32 input and recomputes one layer at a time in backward
    body = layers * tokens * hidden * 4 + layer if checkpointing else layers * layer
    body += 2 * tokens * hidden * 4  # embedding output and final norm
    vocab = cfg.vocab_size
    if selective_head:  # logits for one chunk of rows at a time, and the head's gradient built in forward
        head = min(tokens, chunk_rows_for(vocab, device)) * vocab * 8 + vocab * hidden * 4 + tokens * hidden * 4
    else:  # fp32 logits and log-probabilities for every position
        head = tokens * vocab * 8
    return int(body + head)


def available_memory(device: str) -> int | None:
    try:
        if device == "cuda":
            return torch.cuda.mem_get_info()[0]
        import psutil

        return psutil.virtual_memory().available
    except (ImportError, RuntimeError, OSError):
        return None


def estimate(model, batch: int, length: int, precision: str, checkpointing: bool, device: str,
             selective_head: bool = True) -> MemoryEstimate:
    params = list(_unique_params(model))
    total = sum(_count(p) for p in params)
    trainable = sum(_count(p) for p in params if p.requires_grad)
    weights = sum(p.numel() * p.element_size() for p in params)
    train_bytes = sum(p.numel() * max(p.element_size(), 4) for p in params if p.requires_grad)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    eager = getattr(base.config, "_attn_implementation", "eager") == "eager"
    element = 2 if precision in ("fp16", "bf16") else 4
    acts = activation_bytes(base.config, batch, length, element, checkpointing, eager, selective_head, device)
    return MemoryEstimate(total_params=total, trainable_params=trainable, weights=weights, gradients=train_bytes,
                          optimizer=2 * train_bytes, activations=acts, available=available_memory(device),
                          where="the GPU" if device == "cuda" else "this machine", batch=batch, length=length,
                          checkpointing=checkpointing)


def report(est: MemoryEstimate) -> None:
    log.info(est.summary())
    if est.available and est.total > est.available:
        log.warning(f"the estimate ({est.total / GiB:.2f} GiB) exceeds the free memory ({est.available / GiB:.2f} "
                    "GiB): expect an out-of-memory error. Try --gradient-checkpointing, a smaller --batch-size with "
                    "a larger --grad-accum, a shorter --max-length, or --lora")
