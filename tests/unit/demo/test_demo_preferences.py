"""The DPO demonstration's data: hedged SFT conversations and addition preference pairs in the
HuggingFaceH4/ultrafeedback_binarized layout, with held-out prompts never trained on."""

from __future__ import annotations

import random

import pytest

from chattune.demo import addition
from chattune.demo import preferences as prefs

COLUMNS = ["prompt", "prompt_id", "chosen", "rejected", "messages", "score_chosen", "score_rejected"]


@pytest.fixture(scope="module")
def splits():
    return prefs.preference_splits(n_train=400, n_test=200, seed=3, wrong_share=0.3)


def sums_in(messages):
    return [prefs.operands(m["content"]) for m in messages if m["role"] == "user"]


def test_hub_layout_splits_and_columns(tmp_path):
    import pyarrow.parquet as pq
    from datasets import load_dataset

    root = prefs.write_preference_data(tmp_path / "prefs", n_train=30, n_test=10)
    readme = (root / "README.md").read_text()
    assert "split: train_prefs" in readme and "ultrafeedback_binarized" in readme
    assert pq.read_table(root / "data" / "train_prefs-00000-of-00001.parquet").column_names == COLUMNS
    loaded = load_dataset(str(root))  # as the hub's ultrafeedback_binarized loads: by its README's configs
    assert set(loaded) == {"train_prefs", "test_prefs"}
    assert (loaded["train_prefs"].num_rows, loaded["test_prefs"].num_rows) == (30, 10)
    row = loaded["test_prefs"][0]
    assert row["chosen"][-1]["role"] == row["rejected"][-1]["role"] == "assistant"


def test_pairs_share_the_prompt_and_differ_in_the_reply(splits):
    for row in splits["train_prefs"] + splits["test_prefs"]:
        assert list(row) == COLUMNS
        chosen, rejected = row["chosen"], row["rejected"]
        assert chosen[:-1] == rejected[:-1] and chosen[-1] != rejected[-1]
        assert chosen[-1]["role"] == rejected[-1]["role"] == "assistant" and chosen[-2]["role"] == "user"
        assert row["messages"] == chosen
        assert row["prompt"] == next(m["content"] for m in chosen if m["role"] == "user")
        a, b = prefs.operands(chosen[-2]["content"])
        assert addition.answer_of(chosen[-1]["content"]) == a + b  # chosen: the right sum
        reply = rejected[-1]["content"]
        assert prefs.is_hedge(reply) or addition.answer_of(reply) != a + b  # rejected: a hedge or a wrong sum
        assert row["score_chosen"] > row["score_rejected"]


def test_rejected_mix_follows_wrong_share(splits):
    rows = splits["train_prefs"]
    wrong = sum(not prefs.is_hedge(r["rejected"][-1]["content"]) for r in rows) / len(rows)
    assert 0.2 < wrong < 0.4
    only_hedges = prefs.preference_splits(n_train=50, n_test=5, wrong_share=0.0)
    assert all(prefs.is_hedge(r["rejected"][-1]["content"]) for r in only_hedges["train_prefs"])


def test_held_out_prompts_are_disjoint_from_train(splits):
    train, test = splits["train_prefs"], splits["test_prefs"]
    # every sum asked in a test pair is a held-out operand pair, and no train pair asks one
    assert all(addition.is_held_out(*s) for r in test for s in sums_in(r["chosen"]))
    assert not any(addition.is_held_out(*s) for r in train for s in sums_in(r["chosen"]))
    assert not {r["prompt_id"] for r in train} & {r["prompt_id"] for r in test}
    # ... and none is in the quickstart's (or the hedged) SFT training data either
    sft = prefs.hedged_splits(n_train=400, n_test=10)
    assert not any(addition.is_held_out(*s) for r in sft["train_gen"] for s in sums_in(r["messages"]))


def test_same_seed_same_data():
    assert prefs.preference_splits(20, 5, seed=1) == prefs.preference_splits(20, 5, seed=1)
    assert prefs.preference_splits(20, 5, seed=1) != prefs.preference_splits(20, 5, seed=2)


def test_sft_data_declines_only_sums_asked_as_commands():
    splits = prefs.hedged_splits(n_train=1000, n_test=50, hedge_share=0.8)
    hedged = commands = questions = 0
    for row in splits["train_gen"]:
        msgs = row["messages"]
        for question, answer in zip(msgs, msgs[1:]):
            if answer["role"] != "assistant":
                continue
            a, b = prefs.operands(question["content"])
            if prefs.is_hedge(answer["content"]):
                assert prefs.is_command(question["content"])
                hedged += 1
            else:
                assert addition.answer_of(answer["content"]) == a + b
            commands += prefs.is_command(question["content"])
            questions += not prefs.is_command(question["content"])
    assert 0.7 < hedged / commands < 0.9
    assert 0.3 < commands / (commands + questions) < 0.5  # the rest teach the same sums, answered
    # the held-out conversations are the quickstart's own, right answers only
    assert splits["test_gen"] == addition.addition_splits(n_train=1000, n_test=50)["test_gen"]


def test_commands_are_recognised():
    assert all(prefs.is_command(t.format(a=12, b=34)) for t in prefs.COMMANDS)
    assert not prefs.is_command("What is 12 + 34?") and not prefs.is_command("Add 12 and 34 and 5.")
    assert {t for t in addition.QUESTIONS + addition.FOLLOW_UPS if prefs.is_command(t.format(a=1, b=2))} == \
        set(prefs.COMMANDS)


def test_wrong_sums_and_hedge_detection():
    rng = random.Random(0)
    for a in range(10, 100, 7):
        for b in range(10, 100, 11):
            w = prefs.wrong_sum(rng, a, b)
            assert w != a + b and w > 0
    assert prefs.carries(15, 27) and not prefs.carries(15, 24)
    assert all(prefs.is_hedge(h) and prefs.is_hedge(h[:12]) for h in prefs.HEDGES)  # cut short by a token limit
    assert not prefs.is_hedge("15 + 27 = 42.") and not prefs.is_hedge("")
