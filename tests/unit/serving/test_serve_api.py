"""`chattune serve` through the official `openai` client: one real server process on a loopback port for the
whole module (raw HTTP only where the wire format itself is checked)."""

from __future__ import annotations

import http.client
import json
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import openai
import pytest
import torch

from chattune.inference.generate import generate_replies, stop_token_ids
from chattune.model.load import load_chat_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CONVS = [
    [{"role": "user", "content": "What is 12 + 34?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add 10 and 20."}],
    [{"role": "user", "content": "What is 11 + 11?"}, {"role": "assistant", "content": "11 + 11 = 22."},
     {"role": "user", "content": "And 12 + 12?"}],
]


@pytest.fixture(scope="module")
def booting(start_server, trained_dir, tmp_path_factory):
    """The server process, started first so that it loads while the test process loads its own copy."""
    s = start_server(trained_dir, "--served-model-name", "tiny", "--device", "cpu",
                     log=tmp_path_factory.mktemp("serve") / "server.log")
    yield s
    assert s.stop() == 0, s.log.read_text()[-3000:]  # SIGTERM on an idle server: a clean exit


@pytest.fixture(scope="module")
def chat_model(trained_dir):
    """The served model loaded here: the references the server's replies are compared with."""
    return load_chat_model(str(trained_dir), "cpu")


@pytest.fixture(scope="module")
def server(booting, chat_model):
    return booting.ready()


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _greedy(chat_model, conv, n=16) -> dict:
    return generate_replies(*chat_model, [conv], max_new_tokens=n)[0]


def _no_stop(chat_model) -> dict:
    """logit_bias that bans the end-of-turn tokens: the reply runs to its token limit."""
    return {str(t): -100 for t in stop_token_ids(*chat_model)}


def _post(url: str, path: str, body, headers: dict | None = None) -> tuple[int, bytes]:
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    conn.request("POST", path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    r = conn.getresponse()
    out = r.status, r.read()
    conn.close()
    return out


def _open_stream(url: str, body: dict) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    """A streamed request whose first event has arrived (so it is being generated)."""
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    conn.request("POST", "/v1/completions", body=json.dumps({**body, "stream": True}),
                 headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200 and r.readline().startswith(b"data: {")
    return conn, r


def _wait_for(server, check, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while not check(health := server.get("/health")) and time.monotonic() < deadline:
        time.sleep(0.05)
    return health


def test_models_lists_the_one_served_model(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_greedy_chat_reply_equals_generate_replies(client, chat_model):
    _, tok = chat_model
    for conv in CONVS:
        expected = _greedy(chat_model, conv)
        r = client.chat.completions.create(model="tiny", messages=conv, temperature=0, max_tokens=16,
                                           user="someone", presence_penalty=0)  # fields it ignores are accepted
        choice = r.choices[0]
        assert (choice.message.role, choice.message.content, choice.finish_reason) == \
            ("assistant", expected["reply"], expected["finish_reason"])
        prompt = tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True)
        assert r.usage.prompt_tokens == len(prompt["input_ids"])
        assert r.usage.completion_tokens == expected["tokens"]
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        assert r.object == "chat.completion" and r.model == "tiny" and r.id.startswith("chatcmpl-")


def test_streamed_chat_text_equals_the_plain_reply(client, chat_model):
    conv = CONVS[2]
    plain = client.chat.completions.create(model="tiny", messages=conv, temperature=0, max_tokens=16)
    chunks = list(client.chat.completions.create(model="tiny", messages=conv, temperature=0, max_tokens=16,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content == _greedy(chat_model, conv)["reply"]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [plain.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_stream_wire_format_is_openais(server):
    status, raw = _post(server.url, "/v1/chat/completions",
                        {"model": "tiny", "messages": CONVS[0], "max_tokens": 4, "temperature": 0, "stream": True})
    events = [e for e in raw.decode().split("\n\n") if e.strip()]
    assert status == 200 and all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    last = json.loads(events[-2][6:])
    assert last["choices"][0]["delta"] == {} and last["choices"][0]["finish_reason"] in ("stop", "length")


def test_plain_completion_continues_the_prompt(client, chat_model):
    model, tok = chat_model
    prompt = "12 + 34 ="
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False, eos_token_id=stop_token_ids(model, tok),
                             pad_token_id=tok.pad_token_id)
    expected = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0)
    streamed = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0, stream=True)
    assert r.choices[0].text == "".join(c.choices[0].text for c in streamed) == expected
    assert r.object == "text_completion" and r.usage.prompt_tokens == ids["input_ids"].shape[1]
    two = client.completions.create(model="tiny", prompt=[prompt, "hello"], max_tokens=8, temperature=0)
    assert [c.index for c in two.choices] == [0, 1] and two.choices[0].text == expected


def test_stop_token_limits_seed_and_logit_bias(client, chat_model):
    conv = CONVS[0]
    full = _greedy(chat_model, conv)["reply"]
    stop = full[4:7]
    r = client.chat.completions.create(model="tiny", messages=conv, temperature=0, max_tokens=16, stop=[stop])
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == (full[:full.find(stop)], "stop")
    r = client.chat.completions.create(model="tiny", messages=conv, temperature=0, max_completion_tokens=2)
    assert (r.choices[0].finish_reason, r.usage.completion_tokens) == ("length", 2)
    kw = dict(model="tiny", messages=conv, temperature=1.2, top_p=0.95, seed=11, max_tokens=12)
    assert client.chat.completions.create(**kw).choices[0].message.content == \
        client.chat.completions.create(**kw).choices[0].message.content
    banned = client.chat.completions.create(model="tiny", messages=conv, temperature=0, max_tokens=30,
                                            logit_bias=_no_stop(chat_model))
    assert (banned.choices[0].finish_reason, banned.usage.completion_tokens) == ("length", 30)


@pytest.mark.parametrize("change, param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
    ({"temperature": 2.5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"n": 2}, "n"),
    ({"logprobs": True}, "logprobs"),
    ({"logit_bias": {"999999": 5}}, "logit_bias"),
    ({"messages": [{"role": "user", "content": "hello " * 200}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages.0.content"),
], ids=["empty", "role", "temperature", "top_p", "max_tokens", "n", "logprobs", "logit_bias", "too_long", "image"])
def test_invalid_requests_are_openai_400s(client, change, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**{"model": "tiny", "messages": CONVS[0], **change})
    err = e.value.body
    assert e.value.status_code == 400 and err["param"] == param and err["type"] == "invalid_request_error"
    assert err["message"]
    if param == "messages" and change["messages"]:
        assert err["code"] == "context_length_exceeded"


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4", messages=CONVS[0])
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="hi")


def test_malformed_bodies_and_routes_get_openai_error_shape(server):
    for path, body in [("/v1/chat/completions", b"{not json"), ("/v1/chat/completions", {"model": "tiny"}),
                       ("/v1/completions", {"model": "tiny", "prompt": ""}), ("/v1/nothing", {})]:
        status, raw = _post(server.url, path, body)
        err = json.loads(raw)["error"]
        assert status in (400, 404) and set(err) == {"message", "type", "param", "code"}, (path, raw)
    assert server.get("/health")["status"] == "ok"  # still serving


def test_concurrent_requests_join_one_batch_and_each_gets_its_own_reply(client, server, chat_model):
    convs = [[{"role": "user", "content": f"What is {10 + i} + {20 + 3 * i}?"}] for i in range(8)]
    expected = [_greedy(chat_model, c, 40)["reply"] for c in convs]
    before = server.get("/health")
    # a reply that cannot stop early runs while the 8 arrive: they join its batch at a step boundary
    conn, _ = _open_stream(server.url, {"model": "tiny", "prompt": "hi", "max_tokens": 120, "temperature": 0,
                                        "logit_bias": _no_stop(chat_model)})
    try:
        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(lambda c: client.chat.completions.create(
                model="tiny", messages=c, temperature=0, max_tokens=40), convs))
    finally:
        conn.close()
    assert [r.choices[0].message.content for r in replies] == expected
    health = _wait_for(server, lambda h: h["running"] == 0)
    assert health["requests"] - before["requests"] == 9 and health["joined"] > before["joined"]


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server, chat_model):
    before = server.get("/health")["cancelled"]
    conn, _ = _open_stream(server.url, {"model": "tiny", "prompt": "hi", "max_tokens": 120, "temperature": 0,
                                        "logit_bias": _no_stop(chat_model)})
    conn.close()  # the client goes away after the first piece of text
    health = _wait_for(server, lambda h: h["cancelled"] > before and h["running"] == 0)
    assert health["cancelled"] == before + 1 and health["running"] == 0
