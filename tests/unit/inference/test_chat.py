"""`chattune chat` on a tiny GPT-2 fine-tuned in the test session: the prompt it builds is the token
sequence training used, replies stream and join the history, and the CLI works with --message,
piped input and a real pseudo-terminal."""

from __future__ import annotations

import fcntl
import io
import os
import select
import subprocess
import sys
import termios
import time

import pytest

from chattune.cli import main
from chattune.data.tokenize import encode_conversations
from chattune.inference.chat import ChatSession
from chattune.inference.generate import generate_replies
from chattune.model.load import load_chat_model
from chattune.outputs import IGNORE_INDEX

from conftest import ROOT, cli_command, cli_env

CONV = [{"role": "system", "content": "You are a careful calculator. Answer briefly."},
        {"role": "user", "content": "What is 12 + 34?"}, {"role": "assistant", "content": "12 + 34 = 46."},
        {"role": "user", "content": "And 10 + 10?"}, {"role": "assistant", "content": "10 + 10 = 20."}]


@pytest.fixture(scope="module")
def chat_model(trained_dir):
    return load_chat_model(str(trained_dir), "cpu")


def test_chat_prompt_is_the_token_sequence_training_used(chat_model):
    model, tok = chat_model
    session = ChatSession(model, tok, system=CONV[0]["content"], temperature=0)
    trained = encode_conversations(tok, [CONV])
    ids, labels = trained["input_ids"][0], trained["labels"][0]
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    for k in (2, 4):  # before each assistant reply
        session.messages = [dict(m) for m in CONV[:k]]
        prompt = session.prompt_ids()
        # the chat prompt is exactly the training sequence up to the reply, and the reply's first token
        # is the first one training put loss on
        assert ids[:len(prompt)] == prompt
        assert labels[len(prompt) - 1] == IGNORE_INDEX and labels[len(prompt)] == ids[len(prompt)]
        # what the model is trained to produce next: the reply's tokens, then the end-of-turn token
        reply = tok(CONV[k]["content"], add_special_tokens=False)["input_ids"] + [eot]
        assert ids[len(prompt):len(prompt) + len(reply)] == reply
        assert session.stops == [eot] or eot in session.stops
    # the whole conversation as chat re-renders it equals the training sequence
    full = tok.apply_chat_template(CONV, tokenize=True, return_dict=True)["input_ids"]
    assert list(full) == ids


def test_replies_stream_join_the_history_and_match_training(chat_model):
    model, tok = chat_model
    session = ChatSession(model, tok, system=CONV[0]["content"], temperature=0, max_new_tokens=16)
    pieces = list(session.stream("What is 12 + 34?"))
    first = session.messages[-1]
    assert first["role"] == "assistant" and "".join(pieces) == first["content"]
    # the streamed reply is the greedy reply batch generation gives for the same conversation
    expected = generate_replies(model, tok, [CONV[:2]], max_new_tokens=16)[0]["reply"]
    assert first["content"] == expected and expected.strip()
    # text arrives as it is generated, in more than one piece when the reply has more than one word
    assert len(pieces) >= min(2, len(expected.split()))
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    assert eot not in session.last_reply_ids
    second = session.reply("And 10 + 10?")
    assert [m["role"] for m in session.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert session.messages[-1]["content"] == second
    # the second turn's prompt holds the first exchange, tokenized as training tokenizes it
    trained = encode_conversations(tok, [session.messages])["input_ids"][0]
    assert trained[:len(session.last_prompt_ids)] == session.last_prompt_ids
    session.reset()
    assert session.messages == [CONV[0]]


def test_long_history_drops_oldest_exchanges_to_fit_the_context(chat_model):
    model, tok = chat_model
    session = ChatSession(model, tok, system="Be brief.", temperature=0, max_new_tokens=8)
    for i in range(12):
        session.messages += [{"role": "user", "content": f"What is {10 + i} + {20 + i}?"},
                             {"role": "assistant", "content": f"{10 + i} + {20 + i} = {30 + 2 * i}."}]
    session.reply("What is 11 + 11?")
    assert session.notices and "dropped" in session.notices[0]
    assert session.messages[0]["role"] == "system" and session.messages[-2]["content"] == "What is 11 + 11?"
    assert len(session.last_prompt_ids) + 1 <= session.context


def test_message_and_piped_input(trained_dir, capsys, monkeypatch):
    assert main(["chat", str(trained_dir), "--message", "What is 12 + 34?", "--greedy", "--max-new-tokens", "10",
                 "--system", "Be brief."]) == 0
    once = capsys.readouterr().out
    assert once.strip() and "you>" not in once

    monkeypatch.setattr(sys, "stdin", io.StringIO("What is 12 + 34?\n\n/history\n/quit\nnever read\n"))
    assert main(["chat", str(trained_dir), "--greedy", "--max-new-tokens", "10", "--system", "Be brief."]) == 0
    out = capsys.readouterr().out
    assert "you>" not in out and "assistant>" not in out  # no terminal decoration when piped
    assert "system: Be brief.\nuser: What is 12 + 34?\nassistant: " in out
    assert out.splitlines()[0] == once.splitlines()[0]  # greedy: the same reply as --message


def test_bad_options_give_one_line(trained_dir, capsys):
    assert main(["chat", str(trained_dir), "--message", "hi", "--top-p", "0"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: --top-p")


def _read_until(fd, marker: str, buf: list[str], timeout: float = 180) -> str:
    """Read the terminal until `marker` appears after what was read before; return the new text."""
    start, deadline = len("".join(buf)), time.time() + timeout
    while time.time() < deadline:
        if marker in "".join(buf)[start:]:
            return "".join(buf)[start:]
        ready, _, _ = select.select([fd], [], [], 1)
        if ready:
            try:
                buf.append(os.read(fd, 4096).decode(errors="replace"))
            except OSError:  # the other side closed
                break
    raise AssertionError(f"no {marker!r} on the terminal; got: {''.join(buf)[start:][-2000:]}")


def _own_terminal():
    """In the child: a new session whose controlling terminal is the pseudo-terminal, as in a shell."""
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def test_interactive_session_in_a_pseudo_terminal(trained_dir):
    master, slave = os.openpty()
    proc = subprocess.Popen(cli_command("chat", trained_dir, "--greedy", "--max-new-tokens", 10, "--device", "cpu"),
                            stdin=slave, stdout=slave, stderr=slave, env=cli_env({"TERM": "dumb"}), cwd=ROOT,
                            close_fds=True, preexec_fn=_own_terminal)
    os.close(slave)
    buf: list[str] = []
    try:
        banner = _read_until(master, "you> ", buf)
        assert "/quit" in banner
        os.write(master, b"What is 12 + 34?\n")
        assert "assistant> " in _read_until(master, "you> ", buf)
        os.write(master, b"And 10 + 10?\n")
        assert "assistant> " in _read_until(master, "you> ", buf)
        os.write(master, b"/history\n")
        history = _read_until(master, "you> ", buf)
        assert "user: What is 12 + 34?" in history and "user: And 10 + 10?" in history
        assert history.count("assistant: ") == 2
        os.write(master, b"/quit\n")
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    assert "Traceback" not in "".join(buf)
