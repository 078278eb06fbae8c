"""`chattune serve` with an API key, stopped by SIGTERM or Ctrl-C in the middle of a streamed reply: each case
starts its own server (slow), the API tests share one in test_serve_api.py. Flag errors need no server."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from types import SimpleNamespace

import openai
import pytest

from chattune.cli import main

KEY = "sk-test-9f8e7d6c5b4a"
SHUTDOWN_ERROR = "the server is shutting down; the reply was cut short"


def no_stop_bias(model_dir) -> dict:
    """logit_bias that bans the model's end-of-turn tokens, so a reply runs to its token limit."""
    from transformers import AutoTokenizer, GenerationConfig

    from chattune.inference.generate import stop_token_ids

    model = SimpleNamespace(generation_config=GenerationConfig.from_pretrained(model_dir))
    return {str(t): -100 for t in stop_token_ids(model, AutoTokenizer.from_pretrained(model_dir))}


@pytest.mark.slow
@pytest.mark.parametrize("sig, key_from", [(signal.SIGTERM, "env"), (signal.SIGINT, "flag")],
                         ids=["SIGTERM-key-from-env", "Ctrl-C-key-from-flag"])
def test_key_is_required_and_a_stop_signal_mid_stream_exits_0(start_server, trained_dir, tmp_path, sig, key_from):
    args, env = (["--api-key", KEY], None) if key_from == "flag" else ([], {"CHATTUNE_API_KEY": KEY})
    s = start_server(trained_dir, "--shutdown-grace", "0", "--device", "cpu", *args, log=tmp_path / "server.log",
                     env=env).ready()
    name = trained_dir.name  # the served model id defaults to the directory's name
    try:
        for wrong in ("nope", KEY + "x"):
            with pytest.raises(openai.AuthenticationError) as e:
                openai.OpenAI(base_url=s.url + "/v1", api_key=wrong, max_retries=0).models.list()
            assert e.value.body["code"] == "invalid_api_key" and KEY not in json.dumps(e.value.body)
        with urllib.request.urlopen(s.url + "/") as page:  # the page and /health need no key
            assert b"<title>chattune</title>" in page.read()
        assert s.get("/health")["status"] == "ok"
        client = openai.OpenAI(base_url=s.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == [name]
        got, first, bias = [], threading.Event(), no_stop_bias(trained_dir)

        def read_stream():
            try:
                for chunk in client.completions.create(model=name, prompt="12 + 34", max_tokens=120, stream=True,
                                                       logit_bias=bias):
                    got.append(chunk.choices[0].finish_reason)
                    first.set()
            except openai.APIError as e:  # a stream still running after the grace period ends with this error
                got.append(e.message)
            first.set()

        reader = threading.Thread(target=read_stream)
        reader.start()
        assert first.wait(60)
        rc = s.stop(sig, timeout=30)
        reader.join(30)
    finally:
        s.stop(signal.SIGKILL)
    log = s.log.read_text()
    assert rc == 0 and not reader.is_alive(), log[-2000:]
    assert got[-1] in ("stop", "length", SHUTDOWN_ERROR)
    assert "Finished server process" in log and "API key required" in log
    assert KEY not in log


@pytest.mark.parametrize("flags, message", [
    (["--max-batch-size", "0"], "--max-batch-size must be at least 1, got 0"),
    (["--shutdown-grace", "-1"], "--shutdown-grace must be >= 0, got -1.0"),
])
def test_bad_flags_are_one_line(flags, message, capsys):
    assert main(["serve", "nowhere", *flags]) == 2
    assert capsys.readouterr().err.strip() == f"error: {message}"


def test_a_taken_port_is_one_line_before_the_model_loads(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "no/such/model", "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: cannot listen on 127.0.0.1:{port}: ") and err.endswith("choose another --port or "
                                                                                          "--host")
    assert "\n" not in err


def test_help_imports_neither_torch_nor_the_web_stack():
    code = ("import sys; from chattune.cli import build_parser; build_parser('serve'); "
            "print(sorted(m for m in ('torch', 'transformers', 'fastapi', 'uvicorn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
