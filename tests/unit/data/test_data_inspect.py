"""`chattune data inspect` reports what --max-length cuts and shows which tokens carry loss."""

from __future__ import annotations

import json

from chattune.cli import main
from chattune.data.inspect import render_example
from chattune.data.template import prepare_tokenizer
from chattune.data.tokenize import encode_conversations
from chattune.outputs import IGNORE_INDEX


def _inspect(capsys, model_dir, ultrachat_dir, *extra):
    code = main(["data", "inspect", "--model", str(model_dir), "--dataset", str(ultrachat_dir), "--train-split",
                 "train_gen", "--eval-split", "test_gen", *extra])
    assert code == 0
    return capsys.readouterr().out


def test_inspect_json_reports_truncation_and_marks_only_assistant_tokens(capsys, model_dir, ultrachat_dir, splits,
                                                                         tiny_tokenizer):
    from transformers import AutoTokenizer

    r = json.loads(_inspect(capsys, model_dir, ultrachat_dir, "--max-length", "30", "--example", "5", "--json"))
    convs = [row["messages"] for row in splits["train_gen"]]
    assert r["rows"] == len(convs) and r["format"] == "messages" and r["sampled"] == len(convs)
    assert sum(r["roles"].values()) == sum(len(c) for c in convs)

    tok = AutoTokenizer.from_pretrained(model_dir)
    prepare_tokenizer(tok)
    labels = encode_conversations(tok, convs)["labels"]
    loss_after = sum(sum(lab != IGNORE_INDEX for lab in row[30:]) for row in labels)
    loss_all = sum(sum(lab != IGNORE_INDEX for lab in row) for row in labels)
    t = r["truncation"]
    assert t["max_length"] == 30
    assert t["conversations_cut"] == sum(len(row) > 30 for row in labels) > 0
    assert t["assistant_tokens_lost"] == loss_after > 0
    assert abs(t["assistant_tokens_lost_share"] - loss_after / loss_all) < 1e-9
    assert t["conversations_left_without_loss"] == sum(not any(x != IGNORE_INDEX for x in row[:30]) for row in labels)
    assert r["tokens"]["max"] == max(len(row) for row in labels)

    ex = r["example"]
    assert "".join(ex["tokens"]) == ex["text"] and len(ex["tokens"]) == len(ex["ids"]) == len(ex["loss_mask"])
    marked = "".join(p for p, m in zip(ex["tokens"], ex["loss_mask"]) if m)
    replies = [m["content"] + "<|im_end|>" for m in convs[5] if m["role"] == "assistant"]
    assert marked == "".join(replies)
    assert ex["ids"] == tok.apply_chat_template(convs[5], tokenize=True, return_dict=True)["input_ids"]


def test_inspect_text_output_and_eval_split(capsys, model_dir, ultrachat_dir):
    out = _inspect(capsys, model_dir, ultrachat_dir, "--max-length", "64", "--split", "eval", "--sample", "5")
    assert "[test_gen]: 16 conversations, format messages" in out
    assert "(a sample of 5)" in out and "--max-length 64: cuts" in out
    assert "⟦" in out and "<|im_end|>⟧" in out  # no terminal: trained-on tokens bracketed


def test_colour_rendering_marks_loss_tokens():
    ex = {"tokens": ["<|im_start|>", "user\n", "hi", "<|im_end|>"], "loss_mask": [0, 0, 1, 1], "max_length": 3}
    coloured = render_example(ex, colour=True)
    assert "\033[1;32mhi\033[0m" in coloured and "\033[2muser\n\033[0m" in coloured
    assert "cut at max length" in coloured
    assert render_example(ex, colour=False) == "<|im_start|>user\n⟦hi⟧▌[cut at max length]▐⟦<|im_end|>⟧"


def test_validate_json_for_scripts(capsys, tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n'
                 '{"messages": [{"role": "user", "content": "q"}]}\n')
    assert main(["data", "validate", "--dataset", str(f), "--json"]) == 2
    r = json.loads(capsys.readouterr().out)
    assert r["ok"] is False and r["problems"] == {"no assistant reply": 1}
    assert r["first"][0]["where"] == f"{f} line 2" and r["splits"][0]["valid"] == 1
