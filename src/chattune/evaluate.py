"""Evaluation: loss on assistant tokens (mean over tokens, not over batches), perplexity and
next-token accuracy, from the same selective head that training uses."""

from __future__ import annotations

import math

import torch

from chattune.loss import fast_loss_supported, full_logits_loss_sum, install_selective_head


def batch_stats(model, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss sum, loss-token count, correct top-1 count) for one padded batch."""
    if fast_loss_supported(model):
        install_selective_head(model)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    selective_labels=batch["labels"], with_accuracy=True)
        return out["loss_sum"].float(), out["n_tokens"], out["n_correct"]
    return full_logits_loss_sum(model, batch["input_ids"], batch["attention_mask"], batch["labels"])


def summarize(loss_sum: float, tokens: int, correct: int) -> dict:
    loss = loss_sum / tokens if tokens else float("nan")
    return {
        "loss": loss,
        "perplexity": math.exp(loss) if tokens and loss < 700 else float("inf") if tokens else float("nan"),
        "accuracy": correct / tokens if tokens else float("nan"),
        "tokens": int(tokens),
    }


@torch.no_grad()
def evaluate_batches(model, batches, device=None, autocast=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sum statistics over an iterable of batches; returns tensors so callers can reduce across ranks."""
    was_training = model.training
    model.eval()
    dev = device or next(model.parameters()).device
    totals = torch.zeros(3, dtype=torch.float64, device=dev)
    for batch in batches:
        batch = {k: v.to(dev) for k, v in batch.items()}
        if autocast is not None:
            with autocast():
                s, n, c = batch_stats(model, batch)
        else:
            s, n, c = batch_stats(model, batch)
        totals += torch.stack([s.double(), n.double(), c.double()])
    if was_training:
        model.train()
    return totals
