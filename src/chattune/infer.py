"""Inference: load a model for chat and turn conversations into assistant replies, formatted with the
template saved at training time; `chattune generate` (JSONL in, JSONL out) is built on it."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from chattune.errors import ChattuneError

log = logging.getLogger("chattune")


def inference_dtype(device: str):
    """Half precision where a GPU has it (inference does not need fp32's range); fp32 elsewhere."""
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_chat_model(path: str, device: str | None = None, trust_remote_code: bool = False, dtype=None,
                    revision: str | None = None):
    """Model and tokenizer ready to chat: a chattune output directory keeps its saved template; a
    model without a template (a base model such as gpt2) gets chattune's, exactly as training gives it."""
    from chattune.model import fit_model_to_tokenizer, load_model, load_tokenizer, pick_device
    from chattune.template import prepare_tokenizer

    device = device or pick_device()
    tokenizer = load_tokenizer(path, revision, trust_remote_code)
    model = load_model(path, revision, trust_remote_code, dtype=dtype or inference_dtype(device))
    if not tokenizer.chat_template:
        from transformers import set_seed

        setup = prepare_tokenizer(tokenizer)
        set_seed(42)  # rows for added tokens are drawn at random: a fixed seed keeps scores repeatable
        fit_model_to_tokenizer(model, tokenizer, setup)
        log.info(f"{path} has no chat template; using chattune's (a model not fine-tuned with it will not chat well)")
    elif tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # only pads prompts, which the attention mask hides
    try:
        model.to(device).eval()
    except (RuntimeError, AssertionError) as e:
        raise ChattuneError(f"cannot use device {device!r}: {str(e).splitlines()[0]}") from e
    return model, tokenizer


def stop_token_ids(model, tokenizer) -> list[int]:
    """Ids that end a reply: the generation config's eos (chattune sets it to the end-of-turn token)
    and the tokenizer's eos, for models whose two disagree."""
    eos = model.generation_config.eos_token_id
    ids = list(eos) if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise ChattuneError("the model has no end-of-turn (eos) token, so replies could not stop")
    return ids


def sampling_kwargs(temperature: float, top_p: float) -> dict:
    """generate() arguments: sampling when temperature > 0, else greedy (overriding the model's defaults)."""
    if temperature > 0:
        return {"do_sample": True, "temperature": temperature, "top_p": top_p}
    return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}


def prompt_lengths(tokenizer, conversations: list[list[dict]]) -> list[int]:
    enc = tokenizer.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True, return_dict=True)
    return [len(ids) for ids in enc["input_ids"]]


@torch.no_grad()
def generate_replies(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int = 64,
                     batch_size: int = 16, temperature: float = 0.0, top_p: float = 1.0,
                     seed: int | None = None) -> list[dict]:
    """One reply per conversation, in input order: {'reply', 'tokens', 'finish_reason'}.

    Conversations are batched by prompt length (less padding), left-padded, and end at the end-of-turn
    token; greedy when temperature is 0. A batch that would run past the model's context gets fewer new
    tokens (finish_reason 'length').
    """
    from chattune.model import context_length

    if seed is not None:
        torch.manual_seed(seed)
    device = next(model.parameters()).device
    stops = stop_token_ids(model, tokenizer)
    context = context_length(model.config)
    lengths = prompt_lengths(tokenizer, conversations)
    order = sorted(range(len(conversations)), key=lambda i: lengths[i])
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    out: list[dict | None] = [None] * len(conversations)
    try:
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            longest = max(lengths[i] for i in idx)
            budget = max_new_tokens if context is None else min(max_new_tokens, context - longest)
            if budget < 1:
                raise ChattuneError(f"conversation {idx[-1]} is {longest} tokens long, which leaves no room for a "
                                    f"reply in the model's context of {context} tokens; shorten it")
            enc = tokenizer.apply_chat_template([conversations[i] for i in idx], add_generation_prompt=True,
                                                tokenize=True, return_dict=True, padding=True, return_tensors="pt")
            enc = {k: v.to(device) for k, v in enc.items()}
            gen = model.generate(**enc, max_new_tokens=budget, eos_token_id=stops,
                                 pad_token_id=tokenizer.pad_token_id, **sampling_kwargs(temperature, top_p))
            for i, row in zip(idx, gen[:, enc["input_ids"].shape[1]:].tolist()):
                ids, finish = [], "length"
                for t in row:
                    if t in stops:
                        finish = "stop"
                        break
                    ids.append(t)
                out[i] = {"reply": tokenizer.decode(ids, skip_special_tokens=True), "tokens": len(ids),
                          "finish_reason": finish}
    finally:
        tokenizer.padding_side = side
    return out


# ---- chattune generate: JSONL in, JSONL out ----------------------------------------------------


def _check_prompt(messages) -> str | None:
    """What is wrong with a conversation to be answered, or None; it must end with a user (or tool) turn."""
    from chattune.data.validate import check_messages

    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty list of {role, content} objects"
    if not all(isinstance(m, dict) for m in messages):
        return "every message must be an object with 'role' and 'content'"
    if messages[-1].get("role") == "assistant":
        return "the last message is from the assistant: there is nothing to reply to (drop that message)"
    # the training checker wants a final reply; give it a placeholder so it checks everything before it
    return check_messages(list(messages) + [{"role": "assistant", "content": "-"}])


def read_prompts(path: str | Path, system: str | None = None) -> list[tuple[dict, list[dict]]]:
    """(input row, conversation to answer) for each line of a JSONL file; errors name the line."""
    path = Path(path)
    if not path.is_file():
        raise ChattuneError(f"input file not found: {path}")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ChattuneError(f"{path} line {n}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ChattuneError(f"{path} line {n}: expected a JSON object, got {type(row).__name__}")
            if "messages" in row:
                messages = row["messages"]
            elif isinstance(row.get("prompt"), str) and row["prompt"].strip():
                messages = [{"role": "user", "content": row["prompt"]}]
            else:
                raise ChattuneError(f"{path} line {n}: needs 'messages' (a list of {{role, content}}) or 'prompt' "
                                    f"(a non-empty string); found keys {sorted(row)}")
            problem = _check_prompt(messages)
            if problem:
                raise ChattuneError(f"{path} line {n}: {problem}")
            messages = [{"role": m["role"], "content": m["content"]} for m in messages]
            if system and messages[0]["role"] != "system":
                messages = [{"role": "system", "content": system}] + messages
            rows.append((row, messages))
    if not rows:
        raise ChattuneError(f"{path} has no rows to answer")
    return rows


def run_generate(model_path: str, input_path: str, output_path: str, max_new_tokens: int = 256,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, batch_size: int = 16,
                 system: str | None = None, device: str | None = None) -> dict:
    """Answer every row of INPUT; OUTPUT gets one row per input row, in order, with index (and id if
    the input row had one), reply, tokens (generated, without the end-of-turn token) and finish_reason."""
    rows = read_prompts(input_path, system)
    model, tokenizer = load_chat_model(model_path, device)
    replies = generate_replies(model, tokenizer, [m for _, m in rows], max_new_tokens=max_new_tokens,
                               batch_size=batch_size, temperature=temperature, top_p=top_p, seed=seed)
    out = Path(output_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for i, ((row, _), reply) in enumerate(zip(rows, replies)):
            record = {"index": i, **({"id": row["id"]} if "id" in row else {}), **reply}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, out)  # a crash never leaves a half-written answers file behind
    return {"rows": len(rows), "tokens": sum(r["tokens"] for r in replies),
            "stopped": sum(r["finish_reason"] == "stop" for r in replies), "output": str(out)}
