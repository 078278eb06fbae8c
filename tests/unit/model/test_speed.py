"""The training speed-ups change nothing in what is learned: chattune's loss and gradients on a batch
equal a plain full-logits cross-entropy (transformers' own) over the same assistant tokens."""

from __future__ import annotations

import copy

import pytest
import torch
from datasets import Dataset
from transformers import GPT2Config, GPT2LMHeadModel

from chattune.config import Config
from chattune.data.collate import PadCollator
from chattune.data.template import prepare_tokenizer
from chattune.data.tokenize import encode_conversations
from chattune.model.loss import chunk_rows_for, install_selective_head, linear_cross_entropy_sum
from chattune.model.speed import fuse_activations, loss_inputs, mask_is_redundant


def _gpt2(vocab: int, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    # gpt2's own activation (gelu_new), so the activation swap is exercised; no dropout, so losses are exact
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                      activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def _grads(model) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture()
def batch_and_tokenizer(tiny_tokenizer, splits):
    prepare_tokenizer(tiny_tokenizer)
    convs = [r["messages"] for r in splits["train_gen"][:5]]
    rows = encode_conversations(tiny_tokenizer, convs, max_length=64)
    items = [{"input_ids": i, "labels": lab} for i, lab in zip(rows["input_ids"], rows["labels"])]
    batch = PadCollator(tiny_tokenizer.pad_token_id)(items)
    assert (batch["attention_mask"] == 0).any(), "the batch must hold padding for the mask drop to be tested"
    return batch, tiny_tokenizer, rows


def test_trainer_loss_with_speedups_equals_plain_full_logits_cross_entropy(batch_and_tokenizer, tmp_path):
    from chattune.training.args import sft_args
    from chattune.training.trainer import ChattuneTrainer

    batch, tok, rows = batch_and_tokenizer
    reference = _gpt2(len(tok))
    fast = copy.deepcopy(reference)
    # transformers' own loss: full logits, mean cross-entropy over labels != -100 after the shift
    ref = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    ref.backward()

    cfg = Config()
    cfg.train.output_dir = str(tmp_path)
    trainer = ChattuneTrainer(model=fast, args=sft_args(cfg, "fp32", False, use_cpu=True),
                              train_dataset=Dataset.from_dict(rows), processing_class=tok,
                              data_collator=PadCollator(tok.pad_token_id))
    assert trainer.selective and trainer.speedups["fused_gelu_modules"] == 2
    loss = trainer.compute_loss(fast, dict(batch))
    loss.backward()
    assert abs(loss.item() - ref.item()) < 1e-5
    got, want = _grads(fast), _grads(reference)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4, msg=name)


def test_selective_head_without_speedups_equals_the_same_reference(batch_and_tokenizer):
    batch, tok, _ = batch_and_tokenizer
    reference = _gpt2(len(tok))
    plain = copy.deepcopy(reference)
    ref = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    install_selective_head(plain)
    out = plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], selective_labels=batch["labels"])
    assert abs((out["loss_sum"] / out["n_tokens"]).item() - ref.item()) < 1e-5


def test_fused_activation_matches_gpt2_gelu_and_leaves_the_config_alone():
    model = _gpt2(50)
    ids = torch.randint(0, 50, (2, 9))
    before = model(input_ids=ids).logits
    assert fuse_activations(model) == 2
    assert model.config.activation_function == "gelu_new"
    torch.testing.assert_close(model(input_ids=ids).logits, before, atol=1e-5, rtol=1e-5)
    assert fuse_activations(model) == 0  # idempotent


@pytest.mark.parametrize("mask, redundant", [
    ([[1, 1, 1], [1, 1, 0]], True),  # right padding
    ([[1, 1, 1], [1, 1, 1]], True),  # none
    ([[1, 1, 1], [0, 1, 1]], False),  # left padding: the real tokens would see the pads' positions
    ([[1, 0, 1], [1, 1, 1]], False),  # a hole
])
def test_mask_is_dropped_only_for_trailing_padding(mask, redundant):
    mask = torch.tensor(mask)
    assert mask_is_redundant(mask) is redundant
    ids = torch.ones_like(mask)
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    kept = loss_inputs({"input_ids": ids, "attention_mask": mask}, labels, causal=True)
    assert ("attention_mask" in kept) is (not redundant)
    assert "attention_mask" in loss_inputs({"input_ids": ids, "attention_mask": mask}, labels, causal=False)
    with_positions = {"input_ids": ids, "attention_mask": mask, "position_ids": ids}
    assert "attention_mask" in loss_inputs(with_positions, labels, causal=True)


def test_mask_is_kept_when_a_pad_position_carries_loss():
    mask = torch.tensor([[1, 1, 0]])
    labels = torch.tensor([[5, 5, 5]])
    assert "attention_mask" in loss_inputs({"input_ids": labels, "attention_mask": mask}, labels, causal=True)


def test_head_chunk_memory_is_flat_in_the_vocabulary():
    for vocab in (50_257, 128_256, 262_144):
        rows = chunk_rows_for(vocab, "cpu")
        assert rows * vocab * 4 <= 128 * 2**20 and rows >= 64
    assert chunk_rows_for(50_257, "cuda") > chunk_rows_for(50_257, "cpu")


def test_head_under_bf16_autocast_stays_close_to_fp32():
    torch.manual_seed(0)
    h = torch.randn(37, 16, requires_grad=True)
    w = torch.randn(300, 16, requires_grad=True)
    y = torch.randint(0, 300, (37,))
    ref = torch.nn.functional.cross_entropy(h @ w.t(), y, reduction="sum")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_cross_entropy_sum(h, w, None, y, chunk_rows=8)
    got.backward()
    assert got.dtype == torch.float32
    assert abs(got.item() - ref.item()) < 2e-2 * ref.item()
    assert h.grad.dtype == h.dtype and w.grad.dtype == w.dtype
    assert torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()


def test_attention_dropout_override_reaches_every_layer_and_not_the_config():
    from chattune.model.speed import set_attention_dropout

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=3, n_head=2))
    assert set_attention_dropout(model, 0.0) == 3
    assert all(block.attn.attn_dropout.p == 0.0 for block in model.transformer.h)
    assert model.config.attn_pdrop == 0.1  # the saved model keeps its own setting
    assert all(block.attn.resid_dropout.p == 0.1 for block in model.transformer.h)  # other dropout untouched
