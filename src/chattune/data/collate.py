"""Batching: pad token rows to the longest in the batch.

Hand-written because the rows carry bookkeeping columns (length) that transformers' collators
would try to pad, and labels need -100 padding in the same pass.

For training, the collator also hands over what it knows on the host about the batch it just
built (`host_facts`): on a GPU each of these would otherwise be asked of the device, and every
answer read back makes the host wait for the GPU to finish its queue:

- `num_tokens`: the non-padding tokens (the Trainer's tokens-seen count: the sum of the row lengths,
  where the Trainer sums the attention mask on the device and reads it back),
- `mask_redundant`: rows are real tokens followed by padding that carries no loss, so a causal
  model needs no attention mask (true by construction: rows are padded on the right with -100 labels),
- `loss_index` / `loss_targets`: the flat positions whose next token carries loss and those
  tokens (the selective head would search the labels with nonzero(), a read-back of its size).

With `buckets`, lengths are padded up to the next of a few fixed lengths and the loss rows to the
next of a few fixed counts (`loss_valid` marks the real ones), so a compiled step sees few shapes.
"""

from __future__ import annotations

import bisect

import torch

from chattune.outputs import IGNORE_INDEX

# the keys a training batch carries beside the model's inputs; the trainer removes them before the forward
HOST_KEYS = ("num_tokens", "mask_redundant", "loss_index", "loss_targets", "loss_valid")


def length_buckets(max_length: int, smallest: int = 64) -> tuple[int, ...]:
    """Fixed padded lengths: powers of two from `smallest`, and their midpoints, up to max_length.

    At most ~1.5x padding for the shortest batch of a bucket; length grouping already makes batches
    of similar rows, so the bucket adds little to what the longest row asks."""
    out, b = [], smallest
    while b < max_length:
        out += [b, b + b // 2]
        b *= 2
    return tuple(sorted({x for x in out if x < max_length} | {max_length}))


def round_up(n: int, buckets: tuple[int, ...] | None, multiple: int | None = None) -> int:
    """n rounded up to the next bucket (or a multiple of the largest one past the end), then to `multiple`."""
    if buckets:
        i = bisect.bisect_left(buckets, n)
        n = buckets[i] if i < len(buckets) else -(-n // buckets[-1]) * buckets[-1]
    if multiple:
        n = -(-n // multiple) * multiple
    return n


class PadCollator:
    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None, host_facts: bool = False,
                 buckets: tuple[int, ...] | None = None):
        self.pad_token_id = pad_token_id
        self.multiple = pad_to_multiple_of
        self.host_facts = host_facts
        self.buckets = tuple(sorted(buckets)) if buckets else None

    def __call__(self, rows: list[dict]) -> dict:
        lengths = [len(r["input_ids"]) for r in rows]
        longest = round_up(max(lengths), self.buckets, self.multiple)
        n = len(rows)
        input_ids = torch.full((n, longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((n, longest), dtype=torch.long)
        for i, r in enumerate(rows):
            k = lengths[i]
            input_ids[i, :k] = torch.as_tensor(r["input_ids"])
            labels[i, :k] = torch.as_tensor(r["labels"])
            attention_mask[i, :k] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if self.host_facts:
            batch.update(self.facts(lengths, labels))
        return batch

    def facts(self, lengths: list[int], labels: torch.Tensor) -> dict:
        """What the host knows about the batch (see the module's docstring); host tensors only."""
        rows, cols = (labels[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)
        index = rows * labels.shape[1] + cols  # position b*L + c predicts the label at b*L + c + 1
        targets = labels.reshape(-1).index_select(0, index + 1)
        # __call__ pads on the right only, and pad positions get label -100: the mask is redundant by construction
        facts = {"num_tokens": sum(lengths), "mask_redundant": True, "loss_index": index, "loss_targets": targets}
        if self.buckets:
            # a fixed number of loss rows too: padded with position 0 and target 0, weighted 0 in the loss
            k = len(index)
            size = round_up(max(k, 1), length_buckets(labels.numel()))
            valid = torch.zeros(size, dtype=torch.float32)
            valid[:k] = 1.0
            facts["loss_index"] = torch.cat([index, index.new_zeros(size - k)])
            facts["loss_targets"] = torch.cat([targets, targets.new_zeros(size - k)])
            facts["loss_valid"] = valid
        return facts
