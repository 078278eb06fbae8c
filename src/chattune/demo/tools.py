"""The tool-calling task (`chattune quickstart --task tools`): a calculator tool `add(a, b)`. The user asks a sum
in varied phrasings; the assistant must call `add` with the two integers, the tool returns the sum, and the
assistant answers with the tool's result. Test rows use operand pairs never seen in training. Rows follow
OpenAI's chat fine-tuning format ({"messages": [...], "tools": [...]}, call arguments as JSON strings), in
train/test splits laid out like a hub data set.
"""

from __future__ import annotations

import json
import random

from chattune.demo import addition

ADD_TOOL = {"type": "function", "function": {
    "name": "add", "description": "Add two integers.",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                   "required": ["a", "b"]}}}
# every number follows a space, so that with GPT-2's pre-tokenizer (whole numbers, a leading space kept) a number
# is the same token in the question, the call, the tool's result and the answer: the model learns to copy tokens
QUESTIONS = [q for q in addition.QUESTIONS if not q.startswith("{")] + ["Sum {a} and {b} for me."]
FOLLOW_UPS = ["And what about {a} and {b}?", "Now add {a} and {b}.", "What about {a} plus {b}?"]
SMALL_TALK = [("Hi!", "Hello! Ask me to add two numbers."), ("Who are you?", "I add numbers with my calculator tool."),
              ("Thanks.", "You are welcome."), ("What can you do?", "I can add two integers for you.")]


def call_turns(rng: random.Random, a: int, b: int, k: int) -> list[dict]:
    """The assistant's call, the tool's result and the assistant's answer for one sum."""
    call_id = f"call_{k}_{rng.randrange(16**6):06x}"
    return [{"role": "assistant", "content": None, "tool_calls": [
                {"id": call_id, "type": "function",
                 "function": {"name": "add", "arguments": json.dumps({"a": a, "b": b})}}]},
            {"role": "tool", "tool_call_id": call_id, "content": json.dumps({"result": a + b})},
            {"role": "assistant", "content": answer(a, b)}]


def answer(a: int, b: int) -> str:
    return f"The sum of {a} and {b} is {a + b}."


def conversation(rng: random.Random, pairs: list[tuple[int, int]], system: float = 0.2, small_talk: float = 0.1,
                 max_sums: int = 3) -> list[dict]:
    """One to max_sums sums, each asked, called, answered by the tool and answered (several per conversation
    share the tool definitions at its start, which a tiny model otherwise spends most of its compute on)."""
    msgs = [{"role": "system", "content": rng.choice(addition.SYSTEMS)}] if rng.random() < system else []
    if rng.random() < small_talk:  # turns without a call, so the model also learns when not to call
        question, reply = rng.choice(SMALL_TALK)
        msgs += [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]
    for k in range(rng.randint(1, max_sums)):
        a, b = rng.choice(pairs)
        msgs += [{"role": "user", "content": rng.choice(FOLLOW_UPS if k else QUESTIONS).format(a=a, b=b)},
                 *call_turns(rng, a, b, k)]
    return msgs


def tool_splits(n_train: int = 4000, n_test: int = 100, seed: int = 0, **conv_kw) -> dict[str, list[dict]]:
    """Rows {"messages", "tools"}; test rows use held-out operand pairs only (the quickstart's split of pairs)."""
    rng = random.Random(seed)
    out = {}
    for split, n, held in (("train", n_train, False), ("test", n_test, True)):
        pairs = addition.operand_pairs(held)
        out[split] = [{"messages": conversation(rng, pairs, **conv_kw), "tools": [ADD_TOOL]} for _ in range(n)]
    return out


def texts_of(splits: dict[str, list[dict]]):
    """Text for training the demo tokenizer: every message, call and the tool definition as the template shows."""
    yield "system user assistant tool <tools></tools> <tool_response></tool_response> " + json.dumps(ADD_TOOL)
    for rows in splits.values():
        for row in rows:
            for m in row["messages"]:
                yield m["content"] or ""
                for c in m.get("tool_calls") or []:
                    fn = c["function"]
                    yield json.dumps({"name": fn["name"], "arguments": json.loads(fn["arguments"])})
