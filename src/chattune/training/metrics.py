"""Scoring token rows: loss on assistant tokens (a mean over tokens, not over batches), perplexity and
next-token accuracy, from the same selective head that training uses; the Trainer's evaluation and
`chattune eval` both sum these statistics."""

from __future__ import annotations

import math

import torch

from chattune.data.collate import HOST_KEYS, PadCollator
from chattune.errors import ChattuneError
from chattune.model.loss import fast_loss_supported, full_logits_loss_sum, install_selective_head


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
        # (a training collator's host facts are not needed here: collate.HOST_KEYS)
        batch = {k: v.to(dev) for k, v in batch.items() if k not in HOST_KEYS}
        if autocast is not None:
            with autocast():
                s, n, c = batch_stats(model, batch)
        else:
            s, n, c = batch_stats(model, batch)
        totals += torch.stack([s.double(), n.double(), c.double()])
    if was_training:
        model.train()
    return totals


def eval_autocast(device: str):
    """Mixed precision on CUDA as training uses it; fp32 elsewhere."""
    if device != "cuda":
        return None
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return lambda: torch.autocast("cuda", dtype=dtype)


def score_rows(model, rows, pad_token_id: int, batch_size: int = 8) -> dict:
    """Token-weighted loss, perplexity and accuracy of `model` on tokenized rows (input_ids, labels)."""
    from torch.utils.data import DataLoader

    device = next(model.parameters()).device
    lengths = rows["length"]
    # the longest batch first, so that running out of memory shows at once
    rows = rows.select(sorted(range(len(lengths)), key=lambda i: -lengths[i]))
    loader = DataLoader(rows.select_columns(["input_ids", "labels"]), batch_size=batch_size,
                        collate_fn=PadCollator(pad_token_id))
    totals = evaluate_batches(model, loader, device=device, autocast=eval_autocast(device.type))
    return summarize(*totals.tolist())


def check_aligned(rows, other_rows, tokenizer, name: str, other: str) -> None:
    """Both models must be scored on identical token sequences, or their losses do not compare."""
    if len(rows) != len(other_rows):
        raise ChattuneError(f"{other} keeps {len(other_rows)} conversations within the max length and {name} keeps "
                            f"{len(rows)}: their tokenizers differ, so the losses would not be comparable")
    for i, (a, b, la, lb) in enumerate(zip(rows["input_ids"], other_rows["input_ids"], rows["labels"],
                                           other_rows["labels"])):
        if a != b or la != lb:
            j = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            raise ChattuneError(
                f"{other} splits the conversations into different tokens than {name} (conversation {i}, token {j}: "
                f"{tokenizer.decode(a[j:j + 3])!r} ...), so per-token losses are not comparable; give the model "
                f"{name} was fine-tuned from, or one with the same tokenizer, as --baseline")
