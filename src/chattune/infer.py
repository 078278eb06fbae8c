"""Inference: turn conversations into assistant replies with the template saved at training time."""

from __future__ import annotations

import torch


def load_chat_model(path: str, device: str | None = None, trust_remote_code: bool = False):
    from chattune.model import load_model, load_tokenizer, pick_device

    tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
    model = load_model(path, trust_remote_code=trust_remote_code)
    model.to(device or pick_device()).eval()
    return model, tokenizer


@torch.no_grad()
def generate_replies(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int = 64,
                     batch_size: int = 16, temperature: float = 0.0, top_p: float = 1.0,
                     seed: int | None = None) -> list[dict]:
    """One reply per conversation (batched, left-padded); greedy when temperature is 0."""
    if seed is not None:
        torch.manual_seed(seed)
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    out = []
    try:
        for s in range(0, len(conversations), batch_size):
            batch = conversations[s:s + batch_size]
            enc = tokenizer.apply_chat_template(batch, add_generation_prompt=True, tokenize=True, return_dict=True,
                                                padding=True, return_tensors="pt")
            enc = {k: v.to(device) for k, v in enc.items()}
            kw = dict(do_sample=temperature > 0, max_new_tokens=max_new_tokens,
                      pad_token_id=tokenizer.pad_token_id)
            if temperature > 0:
                kw.update(temperature=temperature, top_p=top_p)
            else:
                kw.update(temperature=None, top_p=None, top_k=None)
            gen = model.generate(**enc, **kw)
            new = gen[:, enc["input_ids"].shape[1]:]
            eos = model.generation_config.eos_token_id
            eos_ids = set(eos if isinstance(eos, list) else [eos])
            for row in new.tolist():
                ids = []
                for t in row:
                    if t in eos_ids or t == tokenizer.pad_token_id:
                        break
                    ids.append(t)
                out.append({"reply": tokenizer.decode(ids, skip_special_tokens=True), "tokens": len(ids)})
    finally:
        tokenizer.padding_side = side
    return out
