"""The selective LM head must learn exactly what a plain full-logits cross-entropy learns."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from chattune.model.loss import full_logits_loss_sum, install_selective_head, linear_cross_entropy_sum


def _model_and_batch(seed=0):
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_positions=32, n_embd=16, n_layer=2, n_head=2, bos_token_id=0,
                                       eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    ids = torch.randint(0, 97, (3, 12))
    attn = torch.ones_like(ids)
    attn[1, 9:] = 0  # a padded row
    labels = ids.clone()
    labels[:, :4] = -100  # a prompt without loss
    labels[attn == 0] = -100
    labels[2, 7] = -100
    return model, ids, attn, labels


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_selective_matches_full_logits(model, ids, attn, labels, base=None) -> dict:
    """Loss and every gradient of the selective head (installed on `base`, the model itself unless it is
    wrapped) equal a full-logits cross-entropy's; returns the gradients."""
    ref, n_ref, _ = full_logits_loss_sum(model, ids, attn, labels)
    (ref / n_ref).backward()
    ref_grads = _grads(model)
    model.zero_grad()
    install_selective_head(base if base is not None else model)
    out = model(input_ids=ids, attention_mask=attn, selective_labels=labels)
    assert int(out["n_tokens"]) == int(n_ref) == int((labels[:, 1:] != -100).sum())
    (out["loss_sum"] / out["n_tokens"]).backward()
    assert abs(out["loss_sum"].item() - ref.item()) < 1e-5 * max(1.0, ref.item())
    grads = _grads(model)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    return grads


def test_selective_loss_and_grads_equal_full_logits_cross_entropy():
    _assert_selective_matches_full_logits(*_model_and_batch())


@pytest.mark.parametrize("chunk_rows", [1, 5, 4096])
def test_chunking_does_not_change_loss_or_gradient(chunk_rows):
    torch.manual_seed(1)
    h = torch.randn(13, 8, requires_grad=True)
    w = torch.randn(50, 8, requires_grad=True)
    b = torch.randn(50, requires_grad=True)
    y = torch.randint(0, 50, (13,))
    ref = torch.nn.functional.cross_entropy(h @ w.t() + b, y, reduction="sum")
    ref.backward()
    ref_grads = [t.grad.clone() for t in (h, w, b)]
    for t in (h, w, b):
        t.grad = None
    got = linear_cross_entropy_sum(h, w, b, y, chunk_rows=chunk_rows)
    (got * 0.5).backward()  # the incoming gradient scales the stored gradients
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    for t, r in zip((h, w, b), ref_grads):
        torch.testing.assert_close(t.grad, 0.5 * r, atol=1e-5, rtol=1e-5)


def test_batch_without_loss_tokens_is_a_zero_that_backpropagates():
    model, ids, attn, labels = _model_and_batch()
    install_selective_head(model)
    out = model(input_ids=ids, attention_mask=attn, selective_labels=torch.full_like(labels, -100))
    assert out["loss_sum"].item() == 0.0 and int(out["n_tokens"]) == 0
    out["loss_sum"].backward()


def test_plain_forward_is_unchanged_for_generation():
    model, ids, attn, _ = _model_and_batch()
    before = model(input_ids=ids, attention_mask=attn).logits
    install_selective_head(model)
    after = model(input_ids=ids, attention_mask=attn).logits
    torch.testing.assert_close(before, after)


def _peft_model(**lora_kw):
    from peft import LoraConfig, get_peft_model

    model, ids, attn, labels = _model_and_batch(seed=3)
    new_rows = [95, 96]  # the rows of tokens a chat template adds, trained next to LoRA (tied embeddings)
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, **lora_kw)
    if "target_modules" not in lora_kw:
        cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["c_attn"],
                         trainable_token_indices={"wte": new_rows})
    peft_model = get_peft_model(model, cfg)
    for name, p in peft_model.named_parameters():  # LoRA B starts at zero; move it so the check means something
        if "lora_B" in name or "trainable_tokens_delta" in name:
            with torch.no_grad():
                p.add_(0.1 * torch.randn_like(p))
    labels[0, 6], labels[2, 10] = 95, 96  # the added tokens are targets too
    return peft_model, ids, attn, labels


def test_lora_with_trainable_token_rows_keeps_the_selective_head_exact():
    from chattune.model.loss import fast_loss_supported

    peft_model, ids, attn, labels = _peft_model()
    base = peft_model.get_base_model()
    assert type(base.get_output_embeddings()).__name__ == "TrainableTokensWrapper"
    assert fast_loss_supported(peft_model)
    grads = _assert_selective_matches_full_logits(peft_model, ids, attn, labels, base=base)
    assert any("trainable_tokens_delta" in n for n in grads) and any("lora_B" in n for n in grads)


def test_a_lora_adapted_head_is_not_taken_for_a_plain_one():
    from chattune.model.loss import fast_loss_supported

    peft_model, ids, attn, labels = _peft_model(target_modules=["c_attn", "lm_head"])
    assert not fast_loss_supported(peft_model)
    ref, _, _ = full_logits_loss_sum(peft_model, ids, attn, labels)
    install_selective_head(peft_model.get_base_model())  # even installed, it runs the head's own forward
    out = peft_model(input_ids=ids, attention_mask=attn, selective_labels=labels)
    torch.testing.assert_close(out["loss_sum"], ref, atol=1e-5, rtol=1e-5)
