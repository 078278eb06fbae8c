"""Preference rows: the accepted shapes, the checks and their report, and tokenization with truncation."""

from __future__ import annotations

import json

import pytest

from chattune.data.preferences import (
    load_preferences,
    to_canonical_pair,
    tokenize_pairs,
    truncate_pair,
)
from chattune.errors import DataError

U = {"role": "user", "content": "What is 12 + 34?"}
SYS = {"role": "system", "content": "Be brief."}
GOOD = {"role": "assistant", "content": "12 + 34 = 46."}
BAD = {"role": "assistant", "content": "12 + 34 = 56."}
PAIR = {"prompt": [SYS, U], "chosen": [GOOD], "rejected": [BAD]}


def test_explicit_implicit_and_ultrafeedback_forms_give_the_same_pair():
    explicit = {"prompt": [SYS, U], "chosen": [GOOD], "rejected": [BAD]}
    # ultrafeedback_binarized: whole conversations, plus a string prompt (the first user turn) that is not used
    ultrafeedback = {"prompt": U["content"], "prompt_id": "x", "chosen": [SYS, U, GOOD], "rejected": [SYS, U, BAD],
                     "messages": [SYS, U, GOOD], "score_chosen": 8.0, "score_rejected": 3.0}
    implicit = {"chosen": [SYS, U, GOOD], "rejected": [SYS, U, BAD]}
    for row in (explicit, ultrafeedback, implicit):
        assert to_canonical_pair(row) == (PAIR, None)


def test_plain_strings_and_json_cells():
    pair, reason = to_canonical_pair({"prompt": U["content"], "chosen": GOOD["content"], "rejected": BAD["content"]})
    assert reason is None and pair == {"prompt": [U], "chosen": [GOOD], "rejected": [BAD]}
    row = {"chosen": json.dumps([U, GOOD]), "rejected": json.dumps([U, BAD])}  # what a CSV cell holds
    assert to_canonical_pair(row)[0] == {"prompt": [U], "chosen": [GOOD], "rejected": [BAD]}


@pytest.mark.parametrize("row, kind", [
    ({"prompt": [U], "chosen": [GOOD]}, "missing rejected"),
    ({"prompt": [U], "chosen": [GOOD], "rejected": None}, "missing rejected"),
    ({"prompt": [U], "chosen": [GOOD], "rejected": [GOOD]}, "identical chosen and rejected"),
    ({"chosen": [U, GOOD], "rejected": [U, GOOD, U]}, "not ending with an assistant reply"),
    ({"chosen": [U, GOOD], "rejected": [{"role": "user", "content": "other"}, BAD]}, "prompts differ"),
    ({"prompt": [U], "chosen": [GOOD], "rejected": [{"role": "assistant", "content": "  "}]}, "empty content"),
    ({"prompt": [{"role": "user", "content": ""}], "chosen": [GOOD], "rejected": [BAD]}, "empty content"),
    ({"prompt": U["content"], "chosen": "a", "rejected": ""}, "empty content"),
    ({"chosen": [GOOD], "rejected": [BAD]}, "no prompt"),
    ({"prompt": [GOOD], "chosen": [GOOD], "rejected": [BAD]}, "role order"),
    ({"chosen": "a", "rejected": [U, BAD]}, "malformed row"),
])
def test_bad_rows_are_rejected_with_their_kind(row, kind):
    pair, reason = to_canonical_pair(row)
    assert pair is None and reason.kind == kind, reason


BAD_ROWS = [
    ({"prompt": [U], "chosen": [GOOD]}, "missing rejected", "the row has no rejected reply"),
    ({"prompt": [U], "chosen": [GOOD], "rejected": [GOOD]}, "identical chosen and rejected",
     "chosen and rejected replies are the same text"),
    ({"chosen": [U, GOOD], "rejected": [U, GOOD, U]}, "not ending with an assistant reply",
     "rejected does not end with an assistant reply (last role: 'user')"),
    ({"chosen": [U, GOOD], "rejected": [{"role": "user", "content": "other"}, BAD]}, "prompts differ",
     "chosen and rejected differ before their last reply (from message 0)"),
    ({"prompt": [U], "chosen": [GOOD], "rejected": [{"role": "assistant", "content": " "}]}, "empty content",
     "rejected: message 1 (assistant) has empty content"),
]


@pytest.mark.parametrize("row, kind, reason", BAD_ROWS, ids=[k for _, k, _ in BAD_ROWS])
def test_a_bad_row_stops_loading_with_a_report_naming_file_and_line(tmp_path, row, kind, reason):
    path = tmp_path / "prefs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [PAIR, PAIR, row, PAIR]) + "\n")
    with pytest.raises(DataError) as err:
        load_preferences(str(path), "train")
    text = str(err.value)
    assert f"{path} [train]: 1 invalid row(s) of 4" in text
    assert f"{path} line 3: {reason}" in text
    assert f"  {kind}: 1 (fix: " in text and "--skip-invalid" in text


def test_skip_invalid_keeps_the_valid_pairs_and_records_the_rest(tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [PAIR, BAD_ROWS[1][0], PAIR]) + "\n")
    split = load_preferences(str(path), "train", skip_invalid=True)
    assert len(split.dataset) == 2 and split.dataset[0] == PAIR and split.format == "preference"
    assert [(p.where, p.reason.kind) for p in split.rejected] == [(f"{path} line 2", "identical chosen and rejected")]


def test_an_ultrafeedback_layout_directory_loads_by_split(ultrafeedback_dir):
    split = load_preferences(str(ultrafeedback_dir), "test_prefs", max_samples=5)
    assert len(split.dataset) == 5 and split.name == f"{ultrafeedback_dir} [test_prefs]"
    pair = split.dataset[0]
    assert pair["chosen"][0]["role"] == "assistant" and pair["prompt"][-1]["role"] == "user"


def _pieces(tok, ids):
    return [tok.decode([i]) for i in ids]


PROMPT = ["<|im_start|>", "us", "er", "\n", "What", " is", " ", "1", "2", " +", " ", "3", "4", "?", "<|im_end|>", "\n",
          "<|im_start|>", "as", "s", "istan", "t", "\n"]
CHOSEN = ["1", "2", " +", " ", "3", "4", " =", " ", "4", "6", ".", "<|im_end|>"]
REJECTED = ["1", "2", " +", " ", "3", "4", " =", " ", "5", "6", ".", "<|im_end|>"]


def test_tokens_are_the_prompt_with_generation_prompt_then_the_reply_and_its_end_of_turn(chat_model):
    _, tok = chat_model
    rows, stats = tokenize_pairs(tok, [{"prompt": [U], "chosen": [GOOD], "rejected": [BAD]}])
    row = rows[0]
    assert _pieces(tok, row["prompt_ids"]) == PROMPT
    assert _pieces(tok, row["chosen_ids"]) == CHOSEN  # the end-of-turn token, not the template's newline after it
    assert _pieces(tok, row["rejected_ids"]) == REJECTED
    assert row["chosen_ids"][-1] == tok.eos_token_id and row["length"] == 22 + 12
    # the labels TRL scores: the reply tokens only, after the prompt
    labels = [-100] * len(row["prompt_ids"]) + row["chosen_ids"]
    assert labels[21:] == [-100] + tok.convert_tokens_to_ids(["1", "2"]) + labels[24:]
    assert (stats.pairs, stats.prompts_cut, stats.replies_cut) == (1, 0, 0)
    assert (stats.prompt_tokens, stats.chosen_tokens, stats.rejected_tokens) == (22, 12, 12)


def test_truncation_cuts_the_prompt_from_the_left_and_keeps_the_replies(chat_model):
    _, tok = chat_model
    rows, stats = tokenize_pairs(tok, [{"prompt": [U], "chosen": [GOOD], "rejected": [BAD]}], max_length=20)
    assert _pieces(tok, rows[0]["prompt_ids"]) == PROMPT[-8:]  # 20 - 12 reply tokens
    assert _pieces(tok, rows[0]["chosen_ids"]) == CHOSEN and _pieces(tok, rows[0]["rejected_ids"]) == REJECTED
    assert (stats.prompts_cut, stats.prompt_tokens_dropped, stats.replies_cut) == (1, 14, 0)
    assert "1 prompts cut from the left (14 tokens)" in stats.summary("train")


def test_truncation_lists():
    prompt, chosen, rejected = list(range(100, 160)), list(range(10)), list(range(20, 26))
    p, c, r, stats = truncate_pair(prompt, chosen, rejected, max_length=40)
    assert (p, c, r) == (list(range(130, 160)), chosen, rejected)  # room for the longer reply
    assert (stats.prompts_cut, stats.prompt_tokens_dropped, stats.replies_cut) == (1, 30, 0)
    # a reply longer than max_length minus the prompt floor (max_length // 8) is cut at its end, and counted
    p, c, r, stats = truncate_pair(list(range(100, 120)), list(range(50)), list(range(5)), max_length=32)
    assert (p, c, r) == ([116, 117, 118, 119], list(range(28)), list(range(5)))
    assert (stats.replies_cut, stats.reply_tokens_dropped, stats.prompt_tokens_dropped) == (1, 22, 16)
    assert "cut at the end (22 tokens" in stats.summary("train")
    assert truncate_pair([1, 2], [3], [4], None)[:3] == ([1, 2], [3], [4])
