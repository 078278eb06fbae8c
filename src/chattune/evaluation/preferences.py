"""Preference accuracy: how often a model gives the chosen reply of a pair a higher log-probability than the
rejected one, and (against a baseline, usually the model it was tuned from) DPO's implicit reward,
log p_model(reply) - log p_baseline(reply), its accuracy and its margin.

Both replies are scored with their end-of-turn token on the same token rows (data/preferences.py), through the
selective log-prob head (model/logprobs.py): memory stays flat in the vocabulary size.
"""

from __future__ import annotations

import numpy as np
import torch

from chattune.model.logprobs import sequence_logprobs


def _batch(rows: list[dict], which: str, pad_id: int):
    seqs = [r["prompt_ids"] + r[f"{which}_ids"] for r in rows]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    completion = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (r, s) in enumerate(zip(rows, seqs)):
        ids[i, :len(s)] = torch.tensor(s)
        attention[i, :len(s)] = 1
        completion[i, len(r["prompt_ids"]):len(s)] = 1
    return ids, attention, completion


@torch.no_grad()
def score_pairs(model, rows, pad_id: int, batch_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """(log p(chosen | prompt), log p(rejected | prompt)) per pair, summed over reply tokens; `rows` are token
    rows (a list or a Dataset with prompt_ids, chosen_ids, rejected_ids)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = {"chosen": [], "rejected": []}
    rows = rows if isinstance(rows, list) else rows.to_list()
    order = np.argsort([len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in rows])
    for start in range(0, len(rows), batch_size):
        chunk = [rows[i] for i in order[start:start + batch_size]]
        for which in out:
            ids, attention, completion = (t.to(device) for t in _batch(chunk, which, pad_id))
            out[which].append(sequence_logprobs(model, ids, attention, completion).float().cpu())
    model.train(was_training)
    back = np.empty(len(rows), dtype=np.int64)
    back[order] = np.arange(len(rows))
    chosen, rejected = (torch.cat(out[k]).numpy()[back] if out[k] else np.zeros(0) for k in ("chosen", "rejected"))
    return chosen, rejected


def preference_summary(chosen: np.ndarray, rejected: np.ndarray, base_chosen: np.ndarray | None = None,
                       base_rejected: np.ndarray | None = None) -> dict:
    """Preference accuracy and log-prob margin; with the baseline's log-probs, the implicit reward's accuracy and
    margin (log-ratios, i.e. beta = 1; TRL's rewards/* are these times beta). Ties count as wrong."""
    margin = chosen - rejected
    result = {"pairs": int(len(margin)), "accuracy": float((margin > 0).mean()) if len(margin) else float("nan"),
              "margin": float(margin.mean()) if len(margin) else float("nan")}
    if base_chosen is not None:
        reward = (chosen - base_chosen) - (rejected - base_rejected)
        result["reward_accuracy"] = float((reward > 0).mean()) if len(reward) else float("nan")
        result["reward_margin"] = float(reward.mean()) if len(reward) else float("nan")
    return result
