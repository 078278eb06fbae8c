"""`chattune data inspect` and `validate` for preference pairs: how many pairs, the token lengths of prompt, chosen
and rejected replies under the model's chat template, and what --max-length would cut (prompts from the left,
replies at their end), counted exactly as `chattune dpo` tokenizes."""

from __future__ import annotations

import numpy as np

from chattune.data.inspect import PERCENTILES, _pick, _sample_indices, _template_name
from chattune.data.mixture import load_training_data
from chattune.data.preferences import encode_pairs, load_preferences, truncate_pair


def _lengths(values) -> dict:
    arr = np.asarray(values)
    return {"mean": round(float(arr.mean()), 1), **{f"p{p}": int(np.percentile(arr, p)) for p in PERCENTILES},
            "max": int(arr.max())}


def inspect_preferences(cfg, tokenizer, max_length: int, split: str = "train", sample: int | None = 2000) -> dict:
    train, evaluation = load_training_data(cfg, loader=load_preferences)
    loaded = _pick(split, train, evaluation)
    ds = loaded.dataset
    idx = _sample_indices(len(ds), sample, cfg.train.seed)
    lengths = {"prompt": [], "chosen": [], "rejected": []}
    cut = {"pairs_cut": 0, "prompts_cut": 0, "prompt_tokens_dropped": 0, "replies_cut": 0, "reply_tokens_dropped": 0}
    turns = []
    for start in range(0, len(idx), 512):
        pairs = ds.select(idx[start:start + 512]).to_list()
        turns += [len(p["prompt"]) for p in pairs]
        for p, c, r in encode_pairs(tokenizer, pairs):
            for key, ids in (("prompt", p), ("chosen", c), ("rejected", r)):
                lengths[key].append(len(ids))
            stats = truncate_pair(p, c, r, max_length)[3]
            cut["pairs_cut"] += int(bool(stats.prompts_cut or stats.replies_cut))
            for key in ("prompts_cut", "prompt_tokens_dropped", "replies_cut", "reply_tokens_dropped"):
                cut[key] += getattr(stats, key)
    return {"data": loaded.name, "split": split, "format": loaded.format, "pairs": len(ds),
            "rejected": len(loaded.rejected), "chat_template": _template_name(tokenizer), "sampled": int(len(idx)),
            "prompt_messages": {"mean": round(float(np.mean(turns)), 2), "max": int(max(turns))},
            "tokens": {k: _lengths(v) for k, v in lengths.items()},
            "truncation": {"max_length": max_length, **cut, "pairs_cut_share": cut["pairs_cut"] / len(idx)}}


def format_inspect_preferences(r: dict) -> str:
    tr = r["truncation"]
    sampled = "" if r["sampled"] == r["pairs"] else f" (a sample of {r['sampled']})"
    lines = [f"{r['data']}: {r['pairs']} preference pairs" + (f", {r['rejected']} invalid rows skipped"
                                                              if r["rejected"] else ""),
             f"messages before the reply: mean {r['prompt_messages']['mean']}, max {r['prompt_messages']['max']}",
             f"tokens{sampled}, {r['chat_template']} template (prompt with the assistant header; replies with the "
             "end-of-turn token):"]
    for key, t in r["tokens"].items():
        lines.append(f"  {key:<9}" + ", ".join(f"{k} {t[k]}" for k in ("mean", *[f"p{p}" for p in PERCENTILES],
                                                                          "max")))
    lines.append(f"--max-length {tr['max_length']}: truncates {tr['pairs_cut']} pairs ({tr['pairs_cut_share']:.1%}): "
                 f"{tr['prompts_cut']} prompts cut from the left ({tr['prompt_tokens_dropped']} tokens), "
                 f"{tr['replies_cut']} replies cut at the end ({tr['reply_tokens_dropped']} tokens)")
    return "\n".join(lines)
