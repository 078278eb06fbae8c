"""The chunked log-prob head (DPO's) against plain full-logits autograd: values, gradients, the TRL contract."""

from __future__ import annotations

import pytest
import torch

from chattune.model.logprobs import install_logprob_head, sequence_logprobs, token_logprobs


def _reference(hidden, weight, bias, targets):
    logits = hidden @ weight.t() + (bias if bias is not None else 0)
    logp = torch.log_softmax(logits, -1)
    p = logp.exp()
    return (logp.gather(1, targets[:, None]).squeeze(1), -(p * logp).sum(-1), logits.mean(-1),
            logits.argmax(-1) == targets)


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("with_stats", [False, True])
@pytest.mark.parametrize("chunk_rows", [3, 64])  # several chunks, one chunk
def test_values_and_gradients_match_full_logits(with_bias, with_stats, chunk_rows):
    torch.manual_seed(0)
    n, h, v = 23, 16, 101
    leaves = [torch.randn(n, h, dtype=torch.float64), torch.randn(v, h, dtype=torch.float64) * 0.5,
              torch.randn(v, dtype=torch.float64) if with_bias else None]
    targets = torch.randint(0, v, (n,))
    scale = torch.randn(n, dtype=torch.float64)  # per-row weights, as DPO's sigmoid factors are
    outs, grads = [], []
    for fn in ("ours", "ref"):
        xs = [x.clone().requires_grad_() if x is not None else None for x in leaves]
        out = token_logprobs(*xs, targets, with_stats=with_stats, chunk_rows=chunk_rows) if fn == "ours" \
            else _reference(*xs, targets)
        (out[0] * scale).sum().backward()
        outs.append(out)
        grads.append([x.grad for x in xs if x is not None])
    ours, ref = outs
    torch.testing.assert_close(ours[0], ref[0].float(), rtol=1e-6, atol=1e-6)  # float32 out, as TRL's
    for g_ours, g_ref in zip(*grads):
        torch.testing.assert_close(g_ours, g_ref, rtol=1e-6, atol=1e-6)
    if with_stats:
        torch.testing.assert_close(ours[1], ref[1].float(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours[2], ref[2].float(), rtol=1e-5, atol=1e-5)
        assert torch.equal(ours[3], ref[3])
    else:
        assert ours[1] is None and ours[2] is None and ours[3] is None


def _batch():
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11], [5, 12, 13, 14, 1, 1, 1]])
    attention = torch.tensor([[1] * 7, [1, 1, 1, 1, 0, 0, 0]])
    completion = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 0, 0, 0]])
    return ids, attention, completion


def test_model_head_matches_full_logits(chat_model):
    model, _ = chat_model
    ids, attention, completion = _batch()
    logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1]
    full = torch.log_softmax(logits, -1).gather(2, ids[:, 1:, None]).squeeze(2) * completion[:, 1:]
    install_logprob_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    labels = ids.masked_fill(completion == 0, -100)
    out = model(input_ids=ids, attention_mask=attention, labels=labels, fused_lm_head=True)
    assert out.log_probs.shape == (2, 6)
    torch.testing.assert_close(out.log_probs, full, rtol=1e-5, atol=1e-5)
    assert bool((out.log_probs[completion[:, 1:] == 0] == 0).all())
    torch.testing.assert_close(sequence_logprobs(model, ids, attention, completion), full.sum(1), rtol=1e-5,
                               atol=1e-5)
    # without the keyword the model's own forward runs (generation is unaffected)
    torch.testing.assert_close(model(input_ids=ids, attention_mask=attention).logits[:, :-1], logits)


def test_sequence_logprobs_installs_the_head_once(chat_model):
    model, _ = chat_model
    ids, attention, completion = _batch()
    first = sequence_logprobs(model, ids, attention, completion)
    assert hasattr(model, "_chattune_unpatched_forward")
    torch.testing.assert_close(sequence_logprobs(model, ids, attention, completion), first)


def test_empty_completion_keeps_the_graph(chat_model):
    model, _ = chat_model
    install_logprob_head(model)
    ids, attention, _ = _batch()
    out = model(input_ids=ids, attention_mask=attention, labels=torch.full_like(ids, -100), fused_lm_head=True)
    out.log_probs.sum().backward()  # a batch without reply tokens must not fail in backward
    assert float(out.log_probs.detach().abs().sum()) == 0.0


def test_under_bf16_autocast_close_to_float32(chat_model):
    model, _ = chat_model
    ids, attention, completion = _batch()
    exact = sequence_logprobs(model, ids, attention, completion)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = sequence_logprobs(model, ids, attention, completion)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, exact, rtol=0.05, atol=0.1)
