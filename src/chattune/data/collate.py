"""Batching: pad token rows to the longest in the batch.

Hand-written because the rows carry bookkeeping columns (length) that transformers' collators
would try to pad, and labels need -100 padding in the same pass.
"""

from __future__ import annotations

import torch

from chattune.outputs import IGNORE_INDEX


class PadCollator:
    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.multiple = pad_to_multiple_of

    def __call__(self, rows: list[dict]) -> dict:
        longest = max(len(r["input_ids"]) for r in rows)
        if self.multiple:
            longest = -(-longest // self.multiple) * self.multiple
        n = len(rows)
        input_ids = torch.full((n, longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((n, longest), dtype=torch.long)
        for i, r in enumerate(rows):
            k = len(r["input_ids"])
            input_ids[i, :k] = torch.as_tensor(r["input_ids"])
            labels[i, :k] = torch.as_tensor(r["labels"])
            attention_mask[i, :k] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
