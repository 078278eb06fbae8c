"""`chattune quickstart --task tools` (run by quickstart.run_tool_quickstart): tool calling, offline on a CPU in a
few minutes.

It builds a small GPT-2 and a data set in OpenAI's tool-calling format (a calculator tool `add(a, b)`; the user
asks sums in varied phrasings, the assistant calls `add`, the tool returns the sum, the assistant answers with
it; demo/tools.py), fine-tunes with the same `train` code path as any run, and scores held-out call accuracy
(the right function with the right arguments, parsed from the reply; operand pairs never seen in training)
and the final answers' exact match, before and after training.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from chattune.config import Config, validate
from chattune.demo import assets, tools
from chattune.outputs import TASK_SCORE_FILE

log = logging.getLogger("chattune")
METRIC = "tool_call_accuracy"
STEPS = 1000  # longer rows than the addition task (the tool definitions), and copying numbers takes a while to emerge
MAX_LENGTH = 448  # the longest conversation (three sums) is ~400 tokens with the demo tokenizer


def tool_config(out: Path, max_steps: int | None = None) -> Config:
    cfg = Config()
    cfg.model.name = str(out / "base-model")
    d = cfg.data
    d.dataset, d.train_split, d.eval_split, d.max_length, d.max_eval_samples = str(out / "data"), "train", "test", \
        MAX_LENGTH, 100
    t = cfg.train
    t.output_dir = str(out)
    t.batch_size, t.grad_accum, t.lr, t.warmup, t.weight_decay = 16, 1, 3e-3, 0.05, 0.01
    t.max_steps = max_steps or STEPS
    t.group_by_length = False
    t.lr_scheduler, t.logging_steps, t.eval_steps, t.save_steps, t.save_total_limit = "cosine", 25, 200, 400, 1
    return validate(cfg)


def score(model, tokenizer, held_out, n: int) -> dict:
    from chattune.evaluation.toolcalls import score_tool_calls

    return score_tool_calls(model.eval(), tokenizer, held_out, max_turns=n, batch_size=50)


def build_assets(out: Path, n_eval: int):
    """The data set and the base model in OUT; returns the held-out split as canonical conversations."""
    from chattune.data.formats import from_messages
    from chattune.data.loading import load_conversations
    from chattune.data.template import render_chatml
    from chattune.data.tools import normalize_tools

    splits = tools.tool_splits(n_test=n_eval)
    assets.write_hub_layout(splits, out / "data", title="Calling an add(a, b) tool",
                            note="rows follow OpenAI's chat fine-tuning format with tools")
    # the tokenizer learns the conversations as the template shows them (tool instructions included), with whole
    # numbers as tokens (GPT-2's pre-tokenizer): the model copies numbers, the tool does the sums
    convs = [from_messages(r, {}) for r in splits["train"]]
    texts = render_chatml(convs, [normalize_tools(r["tools"]) for r in splits["train"]])[0]
    assets.build_base_model(out / "base-model", splits, texts=texts, vocab_size=1000, split_digits=False,
                            n_positions=512)
    log.info(f"built {out / 'base-model'} (2-layer GPT-2, random init) and {out / 'data'} "
             f"({len(splits['train'])} train / {len(splits['test'])} held-out conversations)")
    return load_conversations(str(out / "data"), "test").dataset


def report(before: dict, after: dict, result: dict, steps: int, seconds: float) -> dict:
    return {
        "metric": METRIC, "before": before["call_accuracy"], "after": after["call_accuracy"], "n": after["call_turns"],
        "answer_exact_match_before": before.get("answer_exact_match"),
        "answer_exact_match_after": after.get("answer_exact_match"), "answer_turns": after["answer_turns"],
        "parsed_rate_after": after["parsed_rate"], "invalid_calls_after": after["invalid_calls"],
        "eval_loss_after": result["eval"].get("eval_loss"), "steps": steps, "seconds": round(seconds, 1),
        "sample": after["call_examples"][0],
        "description": "share of held-out call turns (operand pairs never seen in training) where the reply calls "
                       "add with exactly the expected arguments, greedy decoding; answers scored by exact match "
                       "after the reference call and tool result",
    }


def print_result(r: dict, output_dir: str) -> None:
    s = r["sample"]
    print(f"\n{r['metric']} on {r['n']} held-out calls: before {r['before']:.1%} -> after {r['after']:.1%}; "
          f"answers with the tool's result: {r['answer_exact_match_before']:.1%} -> "
          f"{r['answer_exact_match_after']:.1%} ({r['seconds']:.0f} s)")
    print(f"sample call:\n  user:      {s['prompt']}\n  assistant: {' '.join(s['reply'].split())}"
          f"   [{'correct' if s['correct'] else 'wrong'}, expected {s['expected'][0]}]")
    print(f"model: {output_dir}   report: {os.path.join(output_dir, TASK_SCORE_FILE)}")
