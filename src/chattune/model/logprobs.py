"""Log-probabilities of label tokens, scored only where labels are not -100: the selective head (loss.py) for
preference training.

DPO needs one number per reply token (its log-probability), never full-vocabulary logits. TRL's fused LM head
(trl.trainer.utils.add_fused_lm_head) scores every position of the batch on devices without Triton (a CPU:
prompt and padding rows too) and makes ~10 elementwise passes over each (rows, vocab) tile. Here the head runs
on the reply rows only, in row chunks over one reused buffer (loss.py's chunking), so memory stays flat in the
vocabulary size.

Unlike the SFT loss (loss.py), gradients cannot be formed in the forward pass: DPO weighs each sequence's
log-prob by a factor known only after it (the sigmoid of the margin), so the backward recomputes each chunk's
logits and scales the softmax rows by their incoming gradient.

`install_logprob_head` gives a model TRL's `fused_lm_head=True` calling convention (a FusedCausalLMOutput), so
TRL's DPO loss code runs on it unchanged.
"""

from __future__ import annotations

import types

import torch

from chattune.model.loss import _unwrap, chunk_rows_for, fast_loss_supported, head_parts, logits_into
from chattune.model.speed import is_causal_lm, loss_inputs
from chattune.outputs import IGNORE_INDEX

STATS = ("entropy", "mean_logits", "is_top1")  # TRL's logged per-token extras that come cheaply here


class _LinearLogProbs(torch.autograd.Function):
    """log softmax(h_i @ W^T + b)[y_i] for each row i; the optional stats carry no gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_rows, matmul_dtype, with_stats):
        n, vocab = hidden.shape[0], weight.shape[0]
        f32 = dict(dtype=torch.float32, device=hidden.device)
        logp, log_z = torch.empty(n, **f32), torch.empty(n, **f32)
        entropy = torch.empty(n, **f32) if with_stats else None
        is_top1 = torch.empty(n, dtype=torch.bool, device=hidden.device) if with_stats else None
        w = weight.to(matmul_dtype)
        rows = min(chunk_rows, n)
        buffer = torch.empty((rows, vocab), **f32)
        exp_buffer = torch.empty((rows, vocab), **f32) if with_stats else None
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, n, chunk_rows):
                y = targets[s:s + chunk_rows]
                z = logits_into(hidden[s:s + chunk_rows].to(matmul_dtype), w, bias, buffer[:len(y)])
                target = z.gather(1, y[:, None]).squeeze(1)
                top = z.amax(-1)
                z.sub_(top[:, None])
                if with_stats:
                    e = torch.exp(z, out=exp_buffer[:len(y)])
                    sums = e.sum(-1)
                    # entropy = log s - sum(e * (z - top)) / s, the row dot product as a batched matmul
                    dot = torch.bmm(e.unsqueeze(1), z.unsqueeze(2)).view(-1)
                    entropy[s:s + len(y)] = sums.log() - dot / sums
                    is_top1[s:s + len(y)] = target >= top
                else:
                    sums = z.exp_().sum(-1)
                lz = top + sums.log()
                log_z[s:s + len(y)] = lz
                logp[s:s + len(y)] = target - lz
            # the mean logit is linear in h: h . mean(W) + mean(b), no pass over the vocabulary
            mean_logits = None
            if with_stats:
                mean_logits = hidden.float() @ weight.mean(0, dtype=torch.float32)
                if bias is not None:
                    mean_logits += bias.float().mean()
        ctx.save_for_backward(hidden, weight, bias, targets, log_z)
        ctx.chunk_rows, ctx.matmul_dtype = chunk_rows, matmul_dtype
        ctx.mark_non_differentiable(*(t for t in (entropy, mean_logits, is_top1) if t is not None))
        return logp, entropy, mean_logits, is_top1

    @staticmethod
    def backward(ctx, grad_logp, *_):
        hidden, weight, bias, targets, log_z = ctx.saved_tensors
        needs_h, needs_w, needs_b = ctx.needs_input_grad[:3]
        chunk_rows, dtype = ctx.chunk_rows, ctx.matmul_dtype
        grad_h = torch.empty_like(hidden) if needs_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if needs_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if (needs_b and bias is not None) else None
        if grad_logp is None:
            grad_logp = torch.zeros_like(log_z)
        w = weight.to(dtype)
        buffer = hidden.new_empty((min(chunk_rows, hidden.shape[0]), weight.shape[0]), dtype=torch.float32)
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, hidden.shape[0], chunk_rows):
                h, y = hidden[s:s + chunk_rows].to(dtype), targets[s:s + chunk_rows]
                g = grad_logp[s:s + chunk_rows].float()
                # d logp / d logits = onehot(y) - softmax, each row scaled by its incoming gradient
                p = logits_into(h, w, bias, buffer[:len(y)]).sub_(log_z[s:s + len(y), None]).exp_()
                p.mul_(-g[:, None])
                p[torch.arange(len(y), device=y.device), y] += g
                if grad_b is not None:
                    grad_b += p.sum(0)
                gd = p.to(dtype)
                if grad_h is not None:
                    grad_h[s:s + len(y)] = (gd @ w).to(grad_h.dtype)
                if grad_w is not None:
                    if dtype == torch.float32:
                        grad_w.addmm_(gd.t(), h)
                    else:
                        grad_w.add_(gd.t() @ h)
        gw = grad_w.to(weight.dtype) if grad_w is not None else None
        gb = grad_b.to(bias.dtype) if grad_b is not None else None
        return grad_h, gw, gb, None, None, None, None


def token_logprobs(hidden, weight, bias, targets, with_stats: bool = False, chunk_rows: int | None = None):
    """Per-row log-probabilities of `targets` (N,) under the linear head applied to `hidden` (N, H).

    Returns (logp, entropy, mean_logits, is_top1); the last three are None unless `with_stats`. Under autocast
    the matmuls run in the autocast dtype (as the model's own head would), the softmax in float32.
    """
    device = hidden.device.type
    rows = chunk_rows or chunk_rows_for(weight.shape[0], device) // (2 if with_stats else 1)
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    if hidden.shape[0] == 0:
        zero = hidden.sum(-1) * 0.0 + weight.sum() * 0.0  # keeps the graph connected for an empty batch
        stats = (zero.detach(), zero.detach(), zero.detach().bool()) if with_stats else (None, None, None)
        return (zero, *stats)
    return _LinearLogProbs.apply(hidden, weight, bias, targets, max(1, rows), dtype, with_stats)


def install_logprob_head(model, outputs: tuple[str, ...] = ("log_probs",)) -> None:
    """Let `model(..., labels=labels, fused_lm_head=True)` return a FusedCausalLMOutput whose `log_probs`
    (batch, length - 1) hold each label token's log-probability (0 where the label is -100), computed on those
    positions only. Same contract as TRL's add_fused_lm_head, so TRL's trainers read it unchanged; `outputs`
    naming any of STATS fills entropy, mean_logits and is_top1.

    Patched on the instance (as TRL does) so calls through PEFT/DDP wrappers run the wrapper's forward; without
    `fused_lm_head` the model's own forward runs, so generation is unaffected.
    """
    from trl.trainer.utils import FusedCausalLMOutput

    unknown = set(outputs) - {"log_probs", *STATS}
    if unknown:
        raise ValueError(f"install_logprob_head cannot compute {sorted(unknown)}")
    with_stats = bool(set(outputs) & set(STATS))
    original = getattr(model, "_chattune_unpatched_forward", model.forward)
    causal = is_causal_lm(model)

    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None,
                **kwargs):
        if not fused_lm_head:
            if labels is not None:
                kwargs["labels"] = labels
            return original(*args, **kwargs)
        if shift_labels is not None:
            raise ValueError("shift_labels (context parallelism) is not supported by chattune's log-prob head")
        kwargs["use_cache"] = False
        targets = labels[:, 1:]
        mask = targets != IGNORE_INDEX
        # only trailing padding under a causal mask: the mask can go and SDPA takes its causal fast path
        kwargs = loss_inputs(kwargs, labels, causal)
        hidden = getattr(self, self.base_model_prefix)(*args, **kwargs).last_hidden_state
        rows, cols = mask.nonzero(as_tuple=True)
        h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows * hidden.shape[1] + cols)
        parts = head_parts(self.get_output_embeddings())
        if parts is None:
            raise ValueError("the LM head is not a plain linear layer; chattune's log-prob head cannot score it")
        per_row = token_logprobs(h, *parts, targets[rows, cols], with_stats)
        # back to (batch, length - 1), zeros elsewhere; masked_scatter keeps the graph for an empty mask
        full = [None if x is None else x.new_zeros(mask.shape).masked_scatter(mask, x) for x in per_row]
        log_probs, entropy, mean_logits, is_top1 = full
        loss = -log_probs.sum() / (mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
        return FusedCausalLMOutput(loss=loss, log_probs=log_probs, entropy=entropy, mean_logits=mean_logits,
                                   is_top1=is_top1, label_mask=mask)

    model.forward = types.MethodType(forward, model)
    model._chattune_unpatched_forward = original


def sequence_logprobs(model, input_ids, attention_mask, completion_mask) -> torch.Tensor:
    """Sum of the log-probabilities of the completion tokens of each row, (batch,): through the installed head
    (installed here on a model that has none and supports it), else from full logits."""
    labels = input_ids.masked_fill(completion_mask == 0, IGNORE_INDEX)
    base = _unwrap(model)
    if not hasattr(base, "_chattune_unpatched_forward") and fast_loss_supported(model):  # the SFT head's condition
        install_logprob_head(base)
    if hasattr(base, "_chattune_unpatched_forward"):
        out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True)
        return out.log_probs.sum(1)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    targets = labels[:, 1:]
    logp = torch.log_softmax(logits, -1).gather(2, targets.clamp(min=0)[..., None]).squeeze(2)
    return (logp * (targets != IGNORE_INDEX)).sum(1)
