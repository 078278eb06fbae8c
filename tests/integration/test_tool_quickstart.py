"""`chattune quickstart --task tools` end to end (a few steps: the pipeline, not the figure), then the real CLI's
`chat --tools`, `generate` with tools and `eval` (tool-call accuracy) on the model it leaves."""

from __future__ import annotations

import json

from chattune.cli import main


def test_tool_quickstart_then_chat_generate_and_eval_with_tools(tmp_path, capsys, run_cli):
    out = tmp_path / "qs"
    assert main(["quickstart", "--task", "tools", "--output-dir", str(out), "--max-steps", "6"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "eval.json").read_text())
    assert report["metric"] == "tool_call_accuracy" and report["n"] == 200 and report["before"] == 0.0
    assert f"before {report['before']:.1%} -> after {report['after']:.1%}" in printed
    assert (out / "data" / "data" / "train-00000-of-00001.parquet").is_file()
    tokenizer = json.loads((out / "tokenizer.json").read_text())
    assert {"<tool_call>", "</tool_call>"} <= {t["content"] for t in tokenizer["added_tokens"]}

    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([{"name": "add", "description": "Add two integers.", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}]))
    chat = run_cli("chat", out, "--tools", tools, "--greedy", "--max-new-tokens", "24", stdin="What is 12 + 34?\n")
    assert chat.returncode == 0, chat.stderr
    prompts = tmp_path / "in.jsonl"
    prompts.write_text(json.dumps({"prompt": "What is 12 + 34?", "tools": json.loads(tools.read_text())}) + "\n")
    gen = run_cli("generate", out, "--input", prompts, "--output", tmp_path / "out.jsonl", "--max-new-tokens", "24")
    assert gen.returncode == 0, gen.stderr
    row = json.loads((tmp_path / "out.jsonl").read_text())
    assert {"content", "tool_calls", "invalid_tool_calls"} <= set(row)
    ev = run_cli("eval", out, "--dataset", out / "data", "--split", "test", "--max-samples", "8", "--tool-turns", "4",
                 "--json")
    assert ev.returncode == 0, ev.stderr
    scored = json.loads(ev.stdout)["tool_calls"]
    assert scored["call_turns"] == 4 and 0 <= scored["call_accuracy"] <= 1
