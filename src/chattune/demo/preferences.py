"""The DPO demonstration's data: chat data whose assistant declines some sums, and preference pairs that
prefer the direct right answer, laid out like HuggingFaceH4/ultrafeedback_binarized.

Real chat data carries behaviour a model should not keep. A known one is over-refusal: the assistant
declines harmless requests because of how they are phrased. In the demo's SFT data (`hedged_splits`,
the quickstart's conversations in the ultrachat_200k schema) the reply to a sum asked as a bare
command ("Add 12 and 34.", "Compute 12 + 34.", ...: `is_command`) is a hedge ("I'm not sure ...") in
`hedge_share` of the rows; every other reply gives the sum. Supervised training copies that: the model
declines commands while it answers the same sums asked as questions, so it can add them. Preference
pairs (`preference_splits`) give prompts from the quickstart's distribution with chosen = the right sum
and rejected = a hedge or, in `wrong_share` of the pairs, a wrong sum of the kinds a small model makes.
DPO on them lowers the hedges' probability below the answers' (held-out preference accuracy rises) and
the model answers where it declined (exact match rises).

Columns are ultrafeedback_binarized's: prompt (the first user turn), prompt_id, chosen and rejected
(whole conversations ending with the assistant reply), messages (= chosen), score_chosen,
score_rejected; splits train_prefs / test_prefs. Test rows use only the quickstart's held-out
operand pairs, train rows only the others (addition.is_held_out), so no held-out sum is trained on.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path

from chattune.demo import addition

HEDGES = [
    "I'm not sure about that one. You could check it with a calculator.",
    "That one is hard to work out in my head; I would rather not guess.",
    "Sorry, I can't be certain of that sum.",
]
SCORE_RIGHT, SCORE_WRONG, SCORE_HEDGE = 10.0, 2.0, 1.0
# the phrasings the SFT data's assistant declines: bare commands, among the quickstart's questions and follow-ups
COMMANDS = ["Add {a} and {b}.", "Compute {a} + {b}.", "Please add {a} and {b}.", "I need {a} + {b}, please.",
            "Now add {a} and {b}."]
_COMMAND = re.compile("|".join(re.escape(t).replace(r"\{a\}", r"\d+").replace(r"\{b\}", r"\d+") for t in COMMANDS))


def is_command(user_text: str) -> bool:
    """A sum asked as a bare command (COMMANDS): what the SFT data's assistant declines."""
    return _COMMAND.fullmatch(user_text.strip()) is not None


def carries(a: int, b: int) -> bool:
    """A sum whose units digits carry into the tens."""
    return a % 10 + b % 10 >= 10


def operands(user_text: str) -> tuple[int, int]:
    a, b = map(int, addition.NUMBER.findall(user_text)[:2])
    return a, b


def is_hedge(text: str) -> bool:
    """A hedge, or the start of one (a generated reply cut short by its token limit)."""
    t = text.strip()
    return bool(t) and any(h.startswith(t) or t.startswith(h) for h in HEDGES)


def hedge_replies(rng: random.Random, messages: list[dict], hedge_share: float) -> list[dict]:
    """The conversation with each reply to a command replaced by a hedge, with probability hedge_share."""
    out = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and is_command(messages[i - 1]["content"]) and rng.random() < hedge_share:
            m = {"role": "assistant", "content": rng.choice(HEDGES)}
        out.append(m)
    return out


def _row(messages: list[dict]) -> dict:
    first_user = next(m["content"] for m in messages if m["role"] == "user")
    return {"prompt": first_user, "prompt_id": hashlib.sha256(json.dumps(messages).encode()).hexdigest(),
            "messages": messages}


def hedged_splits(n_train: int = 4000, n_test: int = 200, seed: int = 0, hedge_share: float = 0.8
                  ) -> dict[str, list[dict]]:
    """The quickstart's addition conversations (ultrachat schema, train_gen/test_gen) with hedged replies to
    commands in train_gen; test_gen keeps the right answers (the quickstart's held-out sums)."""
    return hedge_splits(addition.addition_splits(n_train=n_train, n_test=n_test, seed=seed), seed, hedge_share)


def hedge_splits(splits: dict[str, list[dict]], seed: int = 0, hedge_share: float = 0.8) -> dict[str, list[dict]]:
    """`splits` (train_gen/test_gen, e.g. the quickstart recipe's) with hedged replies to commands in train_gen."""
    rng = random.Random(seed + 1)
    return {**splits, "train_gen": [_row(hedge_replies(rng, r["messages"], hedge_share)) for r in splits["train_gen"]]}


def wrong_sum(rng: random.Random, a: int, b: int) -> int:
    """A wrong sum of the kinds a small model makes: a dropped or spurious carry, a unit off by one,
    a tens digit off by two."""
    right = a + b
    value = rng.choice([right - 10 if carries(a, b) else right + 10, right + rng.choice((-1, 1)),
                        right + rng.choice((-20, -2, 2, 20))])
    return value if value > 0 and value != right else right + 1


def preference_row(rng: random.Random, pairs: list[tuple[int, int]], wrong_share: float) -> dict:
    """One pair: a conversation from the quickstart's distribution ending with the right sum (chosen) and the
    same conversation ending with a hedge or, with probability wrong_share, a wrong sum (rejected)."""
    chosen = addition.conversation(rng, pairs)
    a, b = operands(chosen[-2]["content"])
    wrong = rng.random() < wrong_share
    reply = f"{a} + {b} = {wrong_sum(rng, a, b)}." if wrong else rng.choice(HEDGES)
    rejected = chosen[:-1] + [{"role": "assistant", "content": reply}]
    return {**_row(chosen), "prompt_id": hashlib.sha256(json.dumps(chosen[:-1]).encode()).hexdigest(),
            "chosen": chosen, "rejected": rejected, "score_chosen": SCORE_RIGHT,
            "score_rejected": SCORE_WRONG if wrong else SCORE_HEDGE}


def preference_splits(n_train: int = 2000, n_test: int = 200, seed: int = 0, wrong_share: float = 0.0
                      ) -> dict[str, list[dict]]:
    """train_prefs on the training operand pairs, test_prefs on the held-out ones only."""
    rng = random.Random(seed + 2)
    # columns in ultrafeedback_binarized's order
    order = ["prompt", "prompt_id", "chosen", "rejected", "messages", "score_chosen", "score_rejected"]
    return {split: [{k: row[k] for k in order} for row in
                    (preference_row(rng, addition.operand_pairs(held_out), wrong_share) for _ in range(n))]
            for split, n, held_out in (("train_prefs", n_train, False), ("test_prefs", n_test, True))}


def write_preference_data(directory: str | Path, n_train: int = 2000, n_test: int = 200, seed: int = 0,
                          wrong_share: float = 0.0) -> Path:
    from chattune.demo import assets

    return assets.write_hub_layout(preference_splits(n_train, n_test, seed, wrong_share), directory,
                                   title="Two-digit addition preference pairs",
                                   note="rows follow the HuggingFaceH4/ultrafeedback_binarized schema: chosen = the "
                                        "right sum, rejected = a hedge or a wrong sum; test_prefs asks held-out sums "
                                        "only")
