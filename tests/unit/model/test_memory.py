"""The pre-training memory estimate: its parts follow the model and settings, its activation term
tracks what autograd really keeps for a GPT-2 forward, and it warns when memory will not suffice."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from chattune.model import memory


def gpt2(n_embd=128, n_layer=2, n_head=4, vocab=1000):
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                                      n_positions=256, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0, bos_token_id=0,
                                      eos_token_id=0))


def saved_tensor_bytes(model, ids) -> int:
    """Bytes autograd keeps for backward in one forward pass (parameters excluded, storages once)."""
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = max(storages.get(s.data_ptr(), 0), s.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):  # the full-logits loss keeps everything
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids.flatten())
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in storages.items() if ptr not in params)


@pytest.mark.parametrize("n_embd, n_layer, batch, length", [(128, 2, 4, 64), (256, 3, 2, 128)])
def test_activation_estimate_tracks_what_autograd_keeps(n_embd, n_layer, batch, length):
    model = gpt2(n_embd, n_layer)
    ids = torch.randint(0, 1000, (batch, length))
    measured = saved_tensor_bytes(model, ids)
    est = memory.activation_bytes(model.config, batch, length, 4, checkpointing=False, eager=False,
                                  selective_head=False)
    assert 0.75 < est / measured < 1.33, (est, measured)


def test_parts_follow_parameters_batch_and_checkpointing():
    model = gpt2()
    n = sum(p.numel() for p in model.parameters())
    e = memory.estimate(model, batch=4, length=128, precision="fp32", checkpointing=False, device="cpu")
    assert e.total_params == e.trainable_params == n
    assert e.weights == e.gradients == 4 * n and e.optimizer == 8 * n
    assert e.total == e.weights + e.gradients + e.optimizer + e.activations

    double = memory.estimate(model, batch=8, length=128, precision="fp32", checkpointing=False, device="cpu")
    assert 1.8 < double.activations / e.activations <= 2.0
    ckpt = memory.estimate(model, batch=4, length=128, precision="fp32", checkpointing=True, device="cpu")
    assert ckpt.activations < e.activations
    for p in model.transformer.h.parameters():
        p.requires_grad_(False)  # as with adapters: frozen weights need no gradient or optimizer state
    frozen = memory.estimate(model, batch=4, length=128, precision="fp32", checkpointing=False, device="cpu")
    assert frozen.trainable_params < n and frozen.optimizer == 8 * frozen.trainable_params
    assert "AdamW state" in e.summary() and "batch 4 x 128 tokens" in e.summary()


def test_warns_when_the_estimate_exceeds_free_memory(monkeypatch, caplog):
    monkeypatch.setattr(memory, "available_memory", lambda device: 1024)
    est = memory.estimate(gpt2(), batch=4, length=128, precision="fp32", checkpointing=False, device="cpu")
    log = logging.getLogger("chattune")
    monkeypatch.setattr(log, "propagate", True)
    with caplog.at_level(logging.INFO, logger="chattune"):
        memory.report(est)
    assert "expect an out-of-memory error" in caplog.text and "--gradient-checkpointing" in caplog.text
