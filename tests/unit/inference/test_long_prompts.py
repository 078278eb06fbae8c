"""Conversations longer than the model's context (issue 11, case 16): for sample replies (the report, `eval
--samples`) the prompt is cut from the left to leave room for the reply, keeping the system prompt when it
fits and the end of the last message; `chattune generate` still refuses them with one line."""

from __future__ import annotations

import pytest

from chattune.commands.eval import format_report, run_eval
from chattune.errors import ChattuneError
from chattune.inference.generate import fit_prompt, generate_replies, prompt_lengths
from chattune.model.load import context_length, load_chat_model

SYSTEM = {"role": "system", "content": "be brief"}


def _long_conversation(turns: int = 12) -> list[dict]:
    conv = [SYSTEM]
    for i in range(turns):
        conv += [{"role": "user", "content": f"what is {i} + {i}? the sky is blue and you are kind"},
                 {"role": "assistant", "content": f"{i} + {i} = {2 * i}. the sky is blue"}]
    return conv + [{"role": "user", "content": "what is 12 + 34"}]


def test_fit_prompt_drops_the_oldest_turns_and_keeps_system_and_last(trained_dir):
    _, tok = load_chat_model(str(trained_dir), "cpu")
    conv = _long_conversation()
    limit = 80
    assert prompt_lengths(tok, [conv])[0] > limit
    fitted, note = fit_prompt(tok, conv, limit)
    assert prompt_lengths(tok, [fitted])[0] <= limit
    assert fitted[0] == SYSTEM and fitted[-1] == conv[-1] and fitted[1]["role"] == "user"
    assert fitted[1:] == conv[len(conv) - len(fitted) + 1:]  # a suffix of the turns: the newest ones
    assert note == f"the oldest {len(conv) - len(fitted)} message(s) left out"
    assert fit_prompt(tok, conv[-1:], limit) == (conv[-1:], None)  # a prompt that fits is left alone


def test_a_last_message_too_long_alone_keeps_its_end(trained_dir):
    _, tok = load_chat_model(str(trained_dir), "cpu")
    conv = [SYSTEM, {"role": "user", "content": "the sky is blue " * 200 + "what is 12 + 34"}]
    fitted, note = fit_prompt(tok, conv, 40)
    assert prompt_lengths(tok, [fitted])[0] <= 40
    assert [m["role"] for m in fitted] == ["user"] and fitted[0]["content"].endswith("what is 12 + 34")
    assert note == "the system prompt left out; the last message cut to its final tokens"


def test_generate_replies_fits_long_prompts_only_when_asked(trained_dir):
    model, tok = load_chat_model(str(trained_dir), "cpu")
    conv = _long_conversation()
    assert prompt_lengths(tok, [conv])[0] > context_length(model.config)
    with pytest.raises(ChattuneError, match="shorten it"):  # `chattune generate`: the user's prompt, refused
        generate_replies(model, tok, [conv], max_new_tokens=8)
    short = [{"role": "user", "content": "what is 12 + 34"}]
    out = generate_replies(model, tok, [conv, short], max_new_tokens=8, fit="left")
    assert out[0]["finish_reason"] in ("stop", "length") and "message(s) left out" in out[0]["cut"]
    assert out[1]["cut"] is None
    assert out[1]["reply"] == generate_replies(model, tok, [short], max_new_tokens=8)[0]["reply"]


def test_eval_samples_answer_conversations_longer_than_the_context(trained_dir, tmp_path):
    import json

    conv = _long_conversation() + [{"role": "assistant", "content": "12 + 34 = 46."}]
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"messages": conv}) + "\n" + json.dumps({"messages": conv[-2:]}) + "\n")
    result = run_eval(str(trained_dir), dataset=str(path), split="train", samples=2, sample_tokens=8, device="cpu")
    assert len(result["samples"]) == 2 and "message(s) left out" in result["samples"][0]["cut"]
    assert result["samples"][1]["cut"] is None
    assert "(cut to fit the context: the oldest " in format_report(result)
