"""`--batch-size auto`: the largest micro-batch that fits the GPU, with the global batch kept.

A GPU runs a bigger micro-batch at a higher share of its peak (one H200 step of GPT-2 124M at 4 x 1024
tokens left the GPU idle ~40% of the time, waiting for the host); the optimizer only sees the global
batch (micro-batch x accumulation x processes), so choosing the split changes nothing in what is learned
beyond float summation order. The global batch with `auto` is what the default layout gives:
DEFAULT_MICRO (4) conversations x --grad-accum. Candidates are the divisors of that number, largest first:
the memory estimate (memory.py) rules out those that cannot fit without trying them, then one probe step
(forward and backward at the longest rows) per candidate confirms the first that fits; running out of
memory in a probe backs off to the next. Without CUDA `auto` is DEFAULT_MICRO x --grad-accum, as before.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from chattune.errors import ChattuneError

log = logging.getLogger("chattune")

AUTO = "auto"
DEFAULT_MICRO = 4  # the micro-batch without a GPU probe; `auto`'s global batch is this x --grad-accum
HEADROOM = 0.9  # share of the free memory a layout may plan to use (the allocator fragments the rest)


@dataclass
class Layout:
    batch: int
    accum: int
    how: str  # what decided it, for the log

    def describe(self) -> str:
        return (f"micro-batch {self.batch} x accumulation {self.accum} = {self.batch * self.accum} conversations per "
                f"optimizer step and process ({self.how})")


def divisors_desc(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def choose_layout(global_batch: int, free_bytes: int, estimate_bytes: Callable[[int], int],
                  probe: Callable[[int], int | None], later_bytes: int = 0) -> Layout:
    """The largest micro-batch m dividing `global_batch` that fits, with accumulation global_batch // m.

    estimate_bytes(m): the planned memory at micro-batch m (weights, gradients, optimizer, activations);
    probe(m): the peak bytes of one forward and backward at m longest rows, or None if it ran out of memory;
    later_bytes: what the probe does not allocate yet but training will (the optimizer's state)."""
    budget = int(free_bytes * HEADROOM)
    tried = []
    for m in divisors_desc(global_batch):
        if m > 1 and estimate_bytes(m) > budget:
            continue  # cannot fit by the estimate: not worth a probe
        peak = probe(m)
        tried.append(m)
        if peak is not None and peak + later_bytes <= budget:
            return Layout(m, global_batch // m, f"largest that fits: probed {', '.join(map(str, tried))}")
    raise ChattuneError(f"even a micro-batch of 1 conversation does not fit in the GPU's free memory "
                        f"({free_bytes / 2**30:.1f} GiB): try --gradient-checkpointing, a shorter --max-length or "
                        "--lora")


def cuda_probe(model, length: int, dtype: torch.dtype | None) -> Callable[[int], int | None]:
    """probe(m) for choose_layout: one forward and backward of m rows of `length` tokens (every position carrying
    loss: the selective head's worst case) on the model (on the GPU), gradients dropped afterwards."""
    from chattune.model.loss import fast_loss_supported, install_selective_head

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    selective = fast_loss_supported(model)
    if selective:
        install_selective_head(base)
    device = next(model.parameters()).device

    def probe(m: int) -> int | None:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        ids = torch.zeros((m, length), dtype=torch.long, device=device)
        try:
            with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
                if selective:
                    loss = model(input_ids=ids, selective_labels=ids)["loss_sum"]
                else:
                    loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.cuda.synchronize(device)
            return torch.cuda.max_memory_allocated(device)
        except torch.cuda.OutOfMemoryError:
            return None
        finally:
            loss = None
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()

    return probe


def auto_layout(model, cfg, device: str, precision: str, processes: int) -> Layout:
    """The layout for `--batch-size auto` (cfg.train.grad_accum counts DEFAULT_MICRO-conversation micro-batches)."""
    global_batch = DEFAULT_MICRO * cfg.train.grad_accum
    if device != "cuda" or processes > 1:
        why = "no GPU to probe" if device != "cuda" else "several processes: not probed, so every rank agrees"
        return Layout(DEFAULT_MICRO, cfg.train.grad_accum, why)
    from chattune.model.memory import estimate

    length, checkpointing = cfg.data.max_length, cfg.train.gradient_checkpointing
    if next(model.parameters()).device.type != device:  # (a 4-bit model is already there and cannot move)
        model.to(device)
    plan = estimate(model, 1, length, precision, checkpointing, device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    free = torch.cuda.mem_get_info()[0] + torch.cuda.memory_allocated()  # what this process's tensors may take
    return choose_layout(global_batch, free,
                         lambda m: estimate(model, m, length, precision, checkpointing, device).total,
                         cuda_probe(model, length, dtype), later_bytes=plan.optimizer)
