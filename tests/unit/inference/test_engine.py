"""The batching engine behind `chattune serve`: greedy replies equal `generate_replies` (alone, in one padded
batch, and when joining a running batch), cache joins keep every row's logits, streamed pieces join to the
final text, stop strings, budgets, seeds, biases, cancelling, and a failed batch that does not stop it."""

from __future__ import annotations

import queue
import threading

import pytest
import torch
from transformers import DynamicCache

from chattune.inference import batch_cache
from chattune.inference.decoding import Detokenizer, SamplingParams
from chattune.inference.engine import SHUTTING_DOWN, Engine, PromptTooLong
from chattune.inference.generate import generate_replies
from chattune.model.load import load_chat_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CONVERSATIONS = [
    [{"role": "user", "content": "What is 12 + 34?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add 10 and 20."}],
    [{"role": "user", "content": "What is 11 + 11?"}, {"role": "assistant", "content": "11 + 11 = 22."},
     {"role": "user", "content": "And 12 + 12?"}],
    [{"role": "user", "content": "hi"}],
    [{"role": "user", "content": "How much is 45 plus 17? Please answer with the sum only."}],
]
GREEDY = SamplingParams(max_tokens=24, temperature=0)


@pytest.fixture(scope="module")
def chat_model(trained_dir):
    return load_chat_model(str(trained_dir), "cpu")


@pytest.fixture(scope="module")
def expected(chat_model):
    """generate_replies' greedy replies, one conversation at a time."""
    return [generate_replies(*chat_model, [c], max_new_tokens=24)[0] for c in CONVERSATIONS]


@pytest.fixture()
def engine(chat_model):
    e = Engine(*chat_model, max_batch_size=8, batch_wait=0.005)
    yield e
    e.close()


def _no_stop(engine) -> dict:
    return {t: -100.0 for t in engine.stop_ids}


def _collect(q: queue.Queue) -> dict:
    events = [q.get(timeout=120)]
    while not events[-1].last:
        events.append(q.get(timeout=120))
    assert events[-1].error is None, events[-1].error
    return {"reply": "".join(e.text for e in events), "tokens": events[-1].completion_tokens,
            "finish_reason": events[-1].finish_reason}


def _held(q: queue.Queue, gate: threading.Event):
    """A sink that holds the worker at a request's first event until `gate` is set: what arrives meanwhile
    waits, and joins at the next step boundary (deterministically, whatever the machine's speed)."""

    first = [True]

    def sink(event):
        q.put(event)
        if first:
            first.clear()
            assert gate.wait(60)

    return sink


def _submit(engine, convs, params=GREEDY) -> list[queue.Queue]:
    qs = [queue.Queue() for _ in convs]
    for c, q in zip(convs, qs):
        engine.submit(engine.encode_chat(c), params, q.put)
    return qs


def _second_request_while_the_first_is_held(engine) -> tuple[queue.Queue, queue.Queue]:
    """A (30 tokens, no stop) starts and is held after its first token; B is submitted; then A is released."""
    gate, qa = threading.Event(), queue.Queue()
    params = SamplingParams(max_tokens=30, temperature=0, logit_bias=_no_stop(engine))
    engine.submit(engine.encode_chat(CONVERSATIONS[0]), params, _held(qa, gate))
    engine.start()
    qa.get(timeout=60)
    (qb,) = _submit(engine, CONVERSATIONS[1:2])
    gate.set()
    return qa, qb


def test_greedy_alone_equals_generate_replies(engine, expected):
    engine.start()
    for conv, want in zip(CONVERSATIONS, expected):
        r = engine.generate(engine.encode_chat(conv), GREEDY)
        assert {"reply": r.text, "tokens": r.completion_tokens, "finish_reason": r.finish_reason} == want


def test_one_padded_batch_equals_generate_replies(chat_model, engine, expected):
    """Queued before the worker starts, prompts of different lengths are prefilled as one left-padded batch."""
    qs = _submit(engine, CONVERSATIONS)
    engine.start()
    assert [_collect(q) for q in qs] == expected
    assert engine.stats["peak_batch"] == len(CONVERSATIONS)
    assert generate_replies(*chat_model, CONVERSATIONS, max_new_tokens=24, batch_size=8) == expected


def test_requests_joining_a_running_batch_keep_their_replies(engine, expected):
    """A is generating (its worker held at its first token) when B, C, D arrive: they join A's batch."""
    gate, qa = threading.Event(), queue.Queue()
    long = SamplingParams(max_tokens=60, temperature=0, logit_bias=_no_stop(engine))
    engine.submit(engine.encode_chat(CONVERSATIONS[0]), long, _held(qa, gate))
    engine.start()
    qa.get(timeout=60)  # A has its first token; the worker waits in A's sink
    qs = _submit(engine, CONVERSATIONS[1:4])
    gate.set()
    assert [_collect(q) for q in qs] == expected[1:4]
    rest = _collect(qa)
    assert (rest["finish_reason"], rest["tokens"]) == ("length", 60)
    assert (engine.stats["peak_batch"], engine.stats["joined"]) == (4, 3)


def test_a_cache_that_cannot_be_joined_makes_new_requests_wait(engine, expected, monkeypatch):
    """The fallback for caches batch_cache does not handle: B waits for A's batch to end, then runs alone."""
    monkeypatch.setattr(batch_cache, "joinable", lambda cache: False)
    qa, qb = _second_request_while_the_first_is_held(engine)
    assert _collect(qb) == expected[1] and _collect(qa)["tokens"] == 30
    assert (engine.stats["peak_batch"], engine.stats["joined"]) == (1, 0)


def test_joined_and_trimmed_caches_give_each_row_its_own_logits(chat_model):
    """batch_cache: two prompts prefilled apart, joined (the shorter left-padded), stepped together, then one
    dropped (its padding trimmed): every step's logits equal those of the row generated alone."""
    model, tok = chat_model
    prompts = [tok(text, return_tensors="pt")["input_ids"] for text in ("12 + 34 = 46. hello there", "hi")]

    def prefill(ids):
        cache, mask = DynamicCache(config=model.config), torch.ones_like(ids)
        out = model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True)
        return cache, mask, out.logits[:, -1]

    def step(cache, mask, tokens):
        mask = torch.cat([mask, mask.new_ones((len(tokens), 1))], dim=1)
        out = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=mask.sum(-1, keepdim=True) - 1,
                    cache=cache, use_cache=True)
        return mask, out.logits[:, -1]

    with torch.inference_mode():
        solo = [prefill(p) for p in prompts]
        (ca, ma, _), (cb, mb, _) = [prefill(p) for p in prompts]
        assert batch_cache.joinable(ca)
        mask = batch_cache.join(ca, ma, cb, mb)
        assert mask.shape == (2, prompts[0].shape[1]) and mask[1].sum() == prompts[1].shape[1]
        tokens = torch.tensor([5, 7])
        mask, joint = step(ca, mask, tokens)
        alone = [step(c, m, tokens[i:i + 1])[1] for i, (c, m, _) in enumerate(solo)]
        torch.testing.assert_close(joint, torch.cat(alone), rtol=1e-4, atol=1e-4)
        mask = batch_cache.select(ca, mask, [1])  # the long row leaves: the short row's padding goes
        assert mask.shape == (1, prompts[1].shape[1] + 1) and bool(mask.all())
        _, after = step(ca, mask, tokens[1:])
        torch.testing.assert_close(after, step(solo[1][0], torch.ones_like(mask), tokens[1:])[1], rtol=1e-4,
                                   atol=1e-4)


def test_stream_pieces_join_to_the_decoded_text_without_partial_characters(chat_model):
    _, tok = chat_model
    text = "12 + 34 = 46. héllo ✓ 日本語 done"
    ids = tok(text)["input_ids"]
    detok, pieces = Detokenizer(tok), []
    for n in range(1, len(ids) + 1):
        piece, hit = detok.update(ids[:n], final=n == len(ids))
        assert not hit and "\ufffd" not in piece
        pieces.append(piece)
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True)


def test_stop_strings_cut_the_text_and_their_beginnings_are_held_back(chat_model):
    _, tok = chat_model
    ids = tok("12 + 34 = 46. ok")["input_ids"]
    detok, pieces, hit = Detokenizer(tok, ("= 4", "zz")), [], False
    for n in range(1, len(ids) + 1):
        piece, hit = detok.update(ids[:n])
        pieces.append(piece)
        assert "=" not in "".join(pieces)  # '=' could begin '= 4': never released before the match is known
        if hit:
            break
    assert hit and "".join(pieces) == "12 + 34 "


def test_stop_string_budget_and_bias_through_the_engine(engine, expected):
    engine.start()
    ids = engine.encode_chat(CONVERSATIONS[0])
    full = expected[0]["reply"]
    stop = full[4:7]
    cut = engine.generate(ids, SamplingParams(max_tokens=24, temperature=0, stop=(stop,)))
    assert (cut.text, cut.finish_reason) == (full[:full.find(stop)], "stop")
    short = engine.generate(ids, SamplingParams(max_tokens=3, temperature=0))
    assert (short.finish_reason, short.completion_tokens) == ("length", 3) and full.startswith(short.text)
    banned = engine.generate(ids, SamplingParams(max_tokens=40, temperature=0, logit_bias=_no_stop(engine)))
    assert (banned.finish_reason, banned.completion_tokens) == ("length", 40)


def test_budget_is_bounded_by_the_context(chat_model, engine):
    context = chat_model[0].config.n_positions
    assert engine.budget(context - 10, None) == 10 and engine.budget(context - 10, 500) == 10
    assert engine.budget(20, 5) == 5
    with pytest.raises(PromptTooLong, match=f"context is {context}"):
        engine.budget(context, 1)


def test_seeded_sampling_repeats_whatever_it_is_batched_with(engine):
    engine.start()
    ids = engine.encode_chat(CONVERSATIONS[2])
    params = SamplingParams(max_tokens=20, temperature=1.5, top_p=0.9, seed=7)
    alone = engine.generate(ids, params)
    qs = _submit(engine, [CONVERSATIONS[0], CONVERSATIONS[2], CONVERSATIONS[4]], params)
    assert [_collect(q) for q in qs][1]["reply"] == alone.text
    other_seeds = {engine.generate(ids, SamplingParams(max_tokens=20, temperature=1.5, seed=s)).text for s in range(4)}
    assert len(other_seeds) > 1  # sampling does vary with the seed


def test_a_cancelled_request_leaves_the_batch(engine):
    gate, q = threading.Event(), queue.Queue()
    params = SamplingParams(max_tokens=90, temperature=0, logit_bias=_no_stop(engine))
    req = engine.submit(engine.encode_chat(CONVERSATIONS[0]), params, _held(q, gate))
    engine.start()
    q.get(timeout=60)
    req.cancel()
    gate.set()
    other = engine.generate(engine.encode_chat(CONVERSATIONS[1]), GREEDY)  # runs after the cancelled row is gone
    assert other.finish_reason in ("stop", "length") and engine.stats["cancelled"] == 1
    assert q.empty()  # nothing more was generated for it, and it got no last event


def test_a_failing_batch_reports_an_error_and_the_engine_goes_on(engine, monkeypatch):
    engine.start()
    ids = engine.encode_chat(CONVERSATIONS[0])
    real, calls = engine._forward, []

    def flaky(*args):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return real(*args)

    monkeypatch.setattr(engine, "_forward", flaky)
    with pytest.raises(RuntimeError, match="generation failed: RuntimeError: boom"):
        engine.generate(ids, GREEDY)
    assert engine.generate(ids, GREEDY).finish_reason in ("stop", "length")


def test_a_failing_prefill_of_joining_requests_leaves_the_running_batch_alone(engine, monkeypatch):
    real, prefills = engine._forward, []

    def fail_second_prefill(input_ids, *args):
        if input_ids.shape[1] > 1:  # a prefill (a decoding step feeds one token per row)
            prefills.append(1)
            if len(prefills) == 2:
                raise RuntimeError("boom")
        return real(input_ids, *args)

    monkeypatch.setattr(engine, "_forward", fail_second_prefill)
    qa, qb = _second_request_while_the_first_is_held(engine)
    assert qb.get(timeout=60).error == "generation failed: RuntimeError: boom"
    assert _collect(qa)["tokens"] == 30


def test_close_ends_waiting_requests_and_refuses_new_ones(chat_model):
    engine = Engine(*chat_model)
    q = queue.Queue()
    engine.submit(engine.encode_chat(CONVERSATIONS[0]), GREEDY, q.put)
    engine.close()  # before the worker ever ran: the waiting request gets the shutdown error
    assert q.get(timeout=5).error == SHUTTING_DOWN and not engine.accepting
    with pytest.raises(RuntimeError, match=SHUTTING_DOWN):
        engine.submit(engine.encode_chat(CONVERSATIONS[0]), GREEDY, q.put)
