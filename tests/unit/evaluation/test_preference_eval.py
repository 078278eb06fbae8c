"""Preference accuracy and the implicit reward: exact on known log-probabilities, the batched scoring equal to
full logits, and `chattune eval` on preference data (against a baseline)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from chattune.commands.eval import run_eval
from chattune.data.preferences import tokenize_pairs
from chattune.evaluation.preferences import format_preference_report, preference_summary, score_pairs

U = {"role": "user", "content": "What is 12 + 34?"}
PAIRS = [{"prompt": [U], "chosen": [{"role": "assistant", "content": "12 + 34 = 46."}],
          "rejected": [{"role": "assistant", "content": "12 + 34 = 56."}]},
         {"prompt": [{"role": "system", "content": "Be brief."}, U],
          "chosen": [{"role": "assistant", "content": "46"}],
          "rejected": [{"role": "assistant", "content": "I would rather not say."}]}]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    yield


def test_summary_counts_ties_as_wrong_and_rewards_against_the_baseline():
    chosen, rejected = np.array([-1.0, -2.0, -3.0, -4.0]), np.array([-2.0, -1.0, -3.0, -5.0])
    s = preference_summary(chosen, rejected)
    assert s == {"pairs": 4, "accuracy": 0.5, "margin": 0.25}  # margins 1, -1, 0 (a tie), 1
    s = preference_summary(chosen, rejected, base_chosen=chosen - 1, base_rejected=rejected)
    assert (s["reward_accuracy"], s["reward_margin"]) == (1.0, 1.0)


def test_scores_equal_full_logits_in_any_batch(chat_model):
    model, tok = chat_model
    rows, _ = tokenize_pairs(tok, PAIRS)
    chosen, rejected = score_pairs(model, rows, tok.pad_token_id, batch_size=1)
    chosen2, rejected2 = score_pairs(model, rows, tok.pad_token_id, batch_size=2)  # padded, reordered by length
    np.testing.assert_allclose(chosen, chosen2, atol=1e-5)
    np.testing.assert_allclose(rejected, rejected2, atol=1e-5)
    for i, row in enumerate(rows):
        for which, got in (("chosen", chosen[i]), ("rejected", rejected[i])):
            ids = torch.tensor([row["prompt_ids"] + row[f"{which}_ids"]])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            n = len(row["prompt_ids"])
            expected = logp[torch.arange(n - 1, ids.shape[1] - 1), ids[0, n:]].sum()
            assert abs(float(expected) - got) < 1e-4


def test_eval_on_preference_pairs_against_a_baseline(trained_dir, ultrafeedback_dir):
    r = run_eval(str(trained_dir), dataset=str(ultrafeedback_dir), max_samples=8, baseline=str(trained_dir))
    assert r["data"] == f"{ultrafeedback_dir} [test_prefs]" and r["pairs"] == 8
    p = r["preference"]
    assert 0 <= p["accuracy"] <= 1 and r["baseline"]["accuracy"] == p["accuracy"]
    # the model against itself: every implicit reward is zero (a tie, counted as wrong)
    assert abs(p["reward_margin"]) < 1e-5 and p["reward_accuracy"] == 0.0
    text = format_preference_report(r)
    assert "8 preference pairs" in text and "implicit reward" in text and "preference accuracy" in text


def test_eval_keeps_scoring_chat_data_as_before(trained_dir):
    r = run_eval(str(trained_dir), max_samples=4)
    assert "preference" not in r and r["conversations"] == 4 and r["loss"] > 0
