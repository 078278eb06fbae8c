"""Joining and trimming the KV caches of batches being generated, for continuous batching.

transformers' caches can drop rows (`batch_select_indices`) but not take in new ones, so a batch that
new requests join is built here: both caches are left-padded to one length and their key/value tensors
stacked. This reaches into `DynamicLayer.keys` / `.values`, so it is done only for caches made entirely
of plain DynamicLayers (full attention, no sliding window, no linear-attention state): `joinable` says
whether it is safe, and the engine lets new requests wait for the running batch otherwise.

Every function takes a cache and its attention mask (rows x cached positions, 0 on left padding) and
returns the new mask; the cache is changed in place.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F
from transformers.cache_utils import DynamicLayer


def joinable(cache) -> bool:
    """Whether `join` and the padding trim of `select` may touch this cache's tensors."""
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer and layer.is_initialized for layer in layers)


def shift(cache, mask: torch.Tensor, n: int) -> torch.Tensor:
    """Add n left-padding positions to every row (n < 0 removes -n leading positions)."""
    for layer in cache.layers:
        if n > 0:
            layer.keys, layer.values = F.pad(layer.keys, (0, 0, n, 0)), F.pad(layer.values, (0, 0, n, 0))
        else:
            layer.keys, layer.values = layer.keys[..., -n:, :], layer.values[..., -n:, :]
    return F.pad(mask, (n, 0)) if n > 0 else mask[:, -n:]


def join(cache, mask: torch.Tensor, other, other_mask: torch.Tensor) -> torch.Tensor:
    """Append `other`'s rows to `cache` (the shorter of the two is left-padded first); the joined mask."""
    la, lb = mask.shape[1], other_mask.shape[1]
    if la < lb:
        mask = shift(cache, mask, lb - la)
    elif lb < la:
        other_mask = shift(other, other_mask, la - lb)
    for x, y in zip(cache.layers, other.layers):
        x.keys, x.values = torch.cat([x.keys, y.keys]), torch.cat([x.values, y.values])
    return torch.cat([mask, other_mask])


def select(cache, mask: torch.Tensor, keep: list[int]) -> torch.Tensor:
    """Keep only the rows `keep`; left padding that no remaining row needs is trimmed (joinable caches)."""
    idx = torch.tensor(keep, device=mask.device)
    cache.batch_select_indices(idx)
    mask = mask[idx]
    unused = int(mask.any(0).long().argmax())  # leading columns that are padding in every row
    if unused and joinable(cache):
        mask = shift(cache, mask, -unused)
    return mask
