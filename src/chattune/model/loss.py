"""Causal-LM loss on loss-carrying positions only, without building full-vocabulary logits.

Written here because transformers builds (batch, length, vocab) logits for every position, and
TRL's fused head scores every position on devices without Triton (CPU): for a small model on a
CPU the LM head and its cross-entropy are most of a step. This computes the head only for tokens
whose label is not -100, in row chunks, and produces the gradients chunk by chunk in the forward
pass, so memory stays flat in the vocabulary size.
"""

from __future__ import annotations

import types

import torch

from chattune.outputs import IGNORE_INDEX

# logits are computed for this many bytes of rows at a time, so memory stays flat in the vocabulary size;
# a GPU runs bigger matmuls better and has the memory for them
CHUNK_BYTES = {"cpu": 128 * 2**20, "cuda": 1024 * 2**20}


def chunk_rows_for(vocab_size: int, device_type: str) -> int:
    budget = CHUNK_BYTES.get(device_type, CHUNK_BYTES["cpu"])
    return max(64, min(8192, budget // (4 * vocab_size)))


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i @ W^T + b, y_i); gradients are computed in forward and scaled in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_rows, matmul_dtype, row_weights=None):
        needs_h, needs_w, needs_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if needs_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if needs_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if (needs_b and bias is not None) else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        w = weight.to(matmul_dtype)
        # one logits buffer for all chunks: a fresh allocation of this size per chunk costs page faults on a CPU
        buffer = hidden.new_empty((min(chunk_rows, hidden.shape[0]), weight.shape[0]), dtype=torch.float32)
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, hidden.shape[0], chunk_rows):
                h, y = hidden[s:s + chunk_rows].to(matmul_dtype), targets[s:s + chunk_rows]
                logits = logits_into(h, w, bias, buffer[:len(y)])
                target_logit = logits.gather(1, y[:, None]).squeeze(1)
                # softmax in place with a single exp per element: the elementwise passes over the
                # (rows, vocab) block are the part of the head that is not matmul
                top = logits.amax(-1, keepdim=True)
                probs = logits.sub_(top).exp_()
                sums = probs.sum(-1)
                row_loss = top.squeeze(1) + sums.log() - target_logit
                rw = row_weights[s:s + chunk_rows] if row_weights is not None else None
                total += (row_loss * rw).sum() if rw is not None else row_loss.sum()
                if grad_h is None and grad_w is None and grad_b is None:
                    continue
                # d CE / d logits = softmax - onehot
                probs.div_(sums[:, None])
                probs[torch.arange(len(y), device=y.device), y] -= 1.0
                if rw is not None:  # rows of weight 0 (padding up to a fixed row count) give no gradient
                    probs.mul_(rw[:, None])
                if grad_b is not None:
                    grad_b += probs.sum(0)
                g = probs.to(matmul_dtype)
                if grad_h is not None:
                    grad_h[s:s + chunk_rows] = (g @ w).to(grad_h.dtype)
                if grad_w is not None and matmul_dtype == torch.float32:
                    grad_w.addmm_(g.t(), h)
                elif grad_w is not None:
                    grad_w.add_(g.t() @ h)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        gb = (grad_b * grad_out).to(ctx.bias_dtype) if grad_b is not None else None
        return gh, gw, gb, None, None, None, None


def logits_into(h, w, bias, out):
    """h @ w^T (+ bias) written into the float32 buffer `out` (one allocation reused for every chunk)."""
    if h.dtype == torch.float32:
        torch.mm(h, w.t(), out=out)
    else:
        out.copy_(h @ w.t())
    if bias is not None:
        out += bias.float()
    return out


def linear_cross_entropy_sum(hidden, weight, bias, targets, chunk_rows: int | None = None, row_weights=None):
    """Summed cross-entropy of the linear head over rows of `hidden` (N, H) with targets (N,).

    Under autocast the matmuls run in the autocast dtype (as the model's own head would) and the
    softmax in float32. `row_weights` (N,) of 0/1 leave rows out of the sum and the gradients (rows
    added only to keep a fixed number of rows for a compiled step).
    """
    if hidden.shape[0] == 0:
        return hidden.sum() * 0.0 + weight.sum() * 0.0  # a differentiable zero for a batch without loss tokens
    device = hidden.device.type
    rows = chunk_rows or chunk_rows_for(weight.shape[0], device)
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    if row_weights is not None:
        row_weights = row_weights.to(torch.float32)
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, rows, dtype, row_weights)


@torch.no_grad()
def linear_argmax(hidden, weight, bias, chunk_rows: int | None = None):
    """Top-1 prediction of the linear head for each row, chunked like the loss."""
    chunk_rows = chunk_rows or chunk_rows_for(weight.shape[0], hidden.device.type)
    out = []
    w = weight.to(hidden.dtype)
    for s in range(0, hidden.shape[0], chunk_rows):
        logits = hidden[s:s + chunk_rows] @ w.t()
        if bias is not None:
            logits = logits + bias.to(logits.dtype)
        out.append(logits.argmax(-1))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.long)


def _unwrap(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def head_parts(head):
    """(weight, bias) that `head` multiplies hidden states by, or None if it does more than that.

    A PEFT trainable-tokens wrapper (the rows of tokens chattune adds, trained next to LoRA on a
    model with tied embeddings) multiplies by the base weight with its trained rows swapped in.
    Anything else must be exactly nn.Linear: a LoRA or quantized subclass changes the product.
    """
    adapter = getattr(head, "token_adapter", None)
    if adapter is not None and type(getattr(adapter, "base_layer", None)) is torch.nn.Linear:
        base = adapter.base_layer
        if adapter.disable_adapters or adapter.merged or not adapter.active_adapters:
            return base.weight, base.bias
        return adapter.get_merged_weights(adapter.active_adapters), base.bias
    if type(head) is torch.nn.Linear:
        return head.weight, head.bias
    return None


def fast_loss_supported(model) -> bool:
    """Our head is a plain linear layer; models that scale or cap logits use their own loss."""
    cfg = _unwrap(model).config.get_text_config()
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier", "lm_head_multiplier"):
        if getattr(cfg, attr, None) not in (None, 1, 1.0):
            return False
    return head_parts(_unwrap(model).get_output_embeddings()) is not None


def install_selective_head(model) -> None:
    """Let `model(..., selective_labels=labels)` return token-level loss sums instead of logits.

    Patched on the instance, like TRL's fused head, so that calls through DDP, FSDP or PEFT wrappers
    still run the wrapper's forward (gradient sync depends on it). Without the keyword the model's
    own forward runs unchanged, so generation is not affected.
    """
    if getattr(model, "_chattune_selective_head", False):
        return
    original = model.forward

    def forward(self, *args, selective_labels=None, with_accuracy=False, loss_index=None, loss_targets=None,
                loss_valid=None, **kwargs):
        if selective_labels is None:
            return original(*args, **kwargs)
        kwargs["use_cache"] = False
        backbone = getattr(self, self.base_model_prefix)
        hidden = backbone(*args, **kwargs).last_hidden_state
        head = self.get_output_embeddings()
        flat = hidden.reshape(-1, hidden.shape[-1])
        if loss_index is not None and not with_accuracy:
            # the positions came from the collator, found on the host (collate.PadCollator.facts): no search on
            # the device, whose size the host would have to wait for; padded rows (loss_valid 0) weigh nothing
            parts = head_parts(head)
            if parts is not None:
                h, n = flat.index_select(0, loss_index), loss_index.shape[0]
                n_tokens = (loss_valid.sum().long() if loss_valid is not None
                            else hidden.new_full((), n, dtype=torch.long))
                return {"loss_sum": linear_cross_entropy_sum(h, *parts, loss_targets, row_weights=loss_valid),
                        "n_tokens": n_tokens}
        targets = selective_labels[:, 1:]
        mask = targets != IGNORE_INDEX
        # gathered by position: boolean indexing would search the mask again in backward, and on a GPU
        # every such search makes the host wait for the device
        rows, cols = mask.nonzero(as_tuple=True)
        h = flat.index_select(0, rows * hidden.shape[1] + cols)
        y = targets[rows, cols]
        parts = head_parts(head)
        if parts is None:  # a head wrapped after install (e.g. sharded): its own forward, on loss rows only
            logits = head(h).float()
            out = {"loss_sum": torch.nn.functional.cross_entropy(logits, y, reduction="sum"), "n_tokens": mask.sum()}
            if with_accuracy:
                out["n_correct"] = (logits.detach().argmax(-1) == y).sum()
            return out
        weight, bias = parts
        out = {"loss_sum": linear_cross_entropy_sum(h, weight, bias, y), "n_tokens": mask.sum()}
        if with_accuracy:
            out["n_correct"] = (linear_argmax(h.detach(), weight.detach(), bias) == y).sum()
        return out

    model.forward = types.MethodType(forward, model)
    model._chattune_selective_head = True


def full_logits_loss_sum(model, input_ids, attention_mask, labels):
    """Reference: the plain full-logits cross-entropy sum over the same tokens (tests, odd models)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    targets = labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                             ignore_index=IGNORE_INDEX, reduction="sum")
    mask = targets != IGNORE_INDEX
    correct = ((logits.argmax(-1) == targets) & mask).sum()
    return loss, mask.sum(), correct
