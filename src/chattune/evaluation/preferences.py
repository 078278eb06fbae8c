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


def evaluate_preferences(model_path: str, split, max_length: int | None = None, batch_size: int = 8,
                         baseline: str | None = None, device: str | None = None, seed: int = 42) -> dict:
    """`chattune eval` on preference pairs (a loaded preference split): MODEL's preference accuracy and margin;
    with a baseline (usually the model MODEL was tuned from) the baseline's too, and the implicit reward's
    accuracy and margin. Both models score the very same token rows (MODEL's tokenizer and template)."""
    import gc

    from chattune.config import read_saved
    from chattune.data.preferences import encode_pairs, tokenize_pairs
    from chattune.errors import ChattuneError
    from chattune.model.hub import load_config
    from chattune.model.load import context_length, load_baseline, load_chat_model, pick_device, resolve_max_length

    device = device or pick_device()
    model, tokenizer = load_chat_model(model_path, device, dtype=torch.float32)
    saved = read_saved(model_path).get("data") or {}
    length = resolve_max_length(max_length or saved.get("max_length"), context_length(model.config), model_path)
    if baseline:
        length = min(length, context_length(load_config(baseline)) or length)
    rows, stats = tokenize_pairs(tokenizer, split.dataset, length)
    chosen, rejected = score_pairs(model, rows, tokenizer.pad_token_id, batch_size)
    result = {"model": model_path, "data": split.name, "pairs": len(rows), "max_length": length,
              "prompts_cut": stats.prompts_cut, "replies_cut": stats.replies_cut,
              "preference": preference_summary(chosen, rejected)}
    if baseline:
        del model
        gc.collect()
        base, base_tok = load_baseline(baseline, tokenizer, device, seed=seed)
        probe = split.dataset.select(range(min(64, len(split.dataset)))).to_list()
        if encode_pairs(base_tok, probe) != encode_pairs(tokenizer, probe):
            raise ChattuneError(f"{baseline} splits the pairs into different tokens than {model_path}, so their "
                                "log-probabilities do not compare; give the model it was tuned from as --baseline")
        base_chosen, base_rejected = score_pairs(base, rows, base_tok.pad_token_id, batch_size)
        result["baseline"] = {"model": baseline, **preference_summary(base_chosen, base_rejected)}
        result["preference"] = preference_summary(chosen, rejected, base_chosen, base_rejected)
    return result


def format_preference_report(r: dict) -> str:
    cut = f"; {r['prompts_cut']} prompts cut from the left" if r["prompts_cut"] else ""
    cut += f"; {r['replies_cut']} replies cut at the end" if r["replies_cut"] else ""
    lines = [f"{r['data']}: {r['pairs']} preference pairs (max length {r['max_length']}{cut})", "",
             f"{'':<11}{'preference accuracy':>21}{'margin':>10}",
             f"{'model':<11}{r['preference']['accuracy']:>21.2%}{r['preference']['margin']:>+10.3f}   {r['model']}"]
    if "baseline" in r:
        b, p = r["baseline"], r["preference"]
        lines.append(f"{'baseline':<11}{b['accuracy']:>21.2%}{b['margin']:>+10.3f}   {b['model']}")
        lines += ["", f"implicit reward (log p_model - log p_baseline, chosen vs rejected): accuracy "
                      f"{p['reward_accuracy']:.2%}, margin {p['reward_margin']:+.3f}"]
    lines += ["", "preference accuracy: the share of pairs whose chosen reply (with its end-of-turn token) has the "
                  "higher log-probability; margin: the mean log-probability difference, chosen - rejected"]
    return "\n".join(lines)
