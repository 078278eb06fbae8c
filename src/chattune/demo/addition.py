"""The quickstart's task: chat conversations that teach two-digit addition, with held-out operand
pairs for scoring, in the ultrachat_200k schema."""

from __future__ import annotations

import hashlib
import json
import random
import re

QUESTIONS = [
    "What is {a} + {b}?",
    "What is {a} plus {b}?",
    "Add {a} and {b}.",
    "Compute {a} + {b}.",
    "{a} + {b} = ?",
    "Please add {a} and {b}.",
    "What do you get when you add {a} and {b}?",
    "Can you tell me the sum of {a} and {b}?",
    "I need {a} + {b}, please.",
    "How much is {a} plus {b}?",
]
FOLLOW_UPS = ["And {a} + {b}?", "Now add {a} and {b}.", "What about {a} plus {b}?"]
SYSTEMS = ["You are a helpful assistant.", "You are a careful calculator. Answer briefly.", "Answer the user's sums."]
NUMBER = re.compile(r"-?\d+")


def reply(a: int, b: int) -> str:
    return f"{a} + {b} = {a + b}."


def is_held_out(a: int, b: int, fraction: float = 0.1) -> bool:
    """Operand pairs reserved for evaluation, chosen by hash so the split never changes."""
    h = int.from_bytes(hashlib.blake2b(f"{a},{b}".encode(), digest_size=4).digest(), "big")
    return h < fraction * 2**32


def operand_pairs(held_out: bool) -> list[tuple[int, int]]:
    """Every two-digit operand pair on one side of the held-out split."""
    return [(a, b) for a in range(10, 100) for b in range(10, 100) if is_held_out(a, b) == held_out]


def conversation(rng: random.Random, pairs: list[tuple[int, int]], multi_turn: float = 0.25,
                 system: float = 0.2, questions: list[str] = QUESTIONS) -> list[dict]:
    msgs = []
    if rng.random() < system:
        msgs.append({"role": "system", "content": rng.choice(SYSTEMS)})
    a, b = rng.choice(pairs)
    msgs += [{"role": "user", "content": rng.choice(questions).format(a=a, b=b)},
             {"role": "assistant", "content": reply(a, b)}]
    if rng.random() < multi_turn:
        a, b = rng.choice(pairs)
        msgs += [{"role": "user", "content": rng.choice(FOLLOW_UPS).format(a=a, b=b)},
                 {"role": "assistant", "content": reply(a, b)}]
    return msgs


def addition_splits(n_train: int = 4000, n_test: int = 200, seed: int = 0, **conv_kw) -> dict[str, list[dict]]:
    """Rows in the ultrachat schema (prompt, prompt_id, messages); test rows use held-out pairs only."""
    rng = random.Random(seed)
    out = {}
    for split, n, pairs in (("train_gen", n_train, operand_pairs(False)), ("test_gen", n_test, operand_pairs(True))):
        rows = []
        for _ in range(n):
            msgs = conversation(rng, pairs, **conv_kw)
            first_user = next(m["content"] for m in msgs if m["role"] == "user")
            rows.append({"prompt": first_user, "prompt_id": hashlib.sha256(json.dumps(msgs).encode()).hexdigest(),
                         "messages": msgs})
        out[split] = rows
    return out


def answer_of(text: str) -> int | None:
    """The last integer in a reply (the sum, in '12 + 34 = 46.')."""
    found = NUMBER.findall(text or "")
    return int(found[-1]) if found else None
