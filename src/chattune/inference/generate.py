"""Generation: conversations to assistant replies, formatted with the chat template saved at training
time, stopping at the end-of-turn token; `chattune generate`, `eval --samples` and the report use it."""

from __future__ import annotations

import logging

import torch

from chattune.data.validate import check_messages
from chattune.errors import ChattuneError
from chattune.model.load import context_length

log = logging.getLogger("chattune")


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


def until_stop(ids: list[int], stops) -> tuple[list[int], bool]:
    """The generated ids before the first stop token, and whether one was reached."""
    for k, t in enumerate(ids):
        if t in stops:
            return ids[:k], True
    return ids, False


def sampling_kwargs(temperature: float, top_p: float) -> dict:
    """generate() arguments: sampling when temperature > 0, else greedy (overriding the model's defaults)."""
    if temperature > 0:
        return {"do_sample": True, "temperature": temperature, "top_p": top_p}
    return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}


def prompt_ids(tokenizer, conversations: list[list[dict]], tools: list | None = None) -> list[list[int]]:
    """Each conversation rendered with the generation prompt and tokenized; tools: each conversation's tool
    definitions or None (transformers takes one tools list per call, so tool conversations go one by one)."""
    if not tools or not any(tools):
        enc = tokenizer.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True, return_dict=True)
        return [list(ids) for ids in enc["input_ids"]]
    return [list(tokenizer.apply_chat_template(c, tools=t or None, add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"]) for c, t in zip(conversations, tools)]


def prompt_lengths(tokenizer, conversations: list[list[dict]], tools: list | None = None) -> list[int]:
    return [len(ids) for ids in prompt_ids(tokenizer, conversations, tools)]


@torch.no_grad()
def generate_replies(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int = 64,
                     batch_size: int = 16, temperature: float = 0.0, top_p: float = 1.0,
                     seed: int | None = None, tools: list | None = None) -> list[dict]:
    """One reply per conversation, in input order: {'reply', 'tokens', 'finish_reason'}.

    Conversations are batched by prompt length (less padding), left-padded, and end at the end-of-turn
    token; greedy when temperature is 0. A batch that would run past the model's context gets fewer new
    tokens (finish_reason 'length'). tools: each conversation's tool definitions (or None); a reply to a
    conversation with tools (a list, [] included) also has 'tool_calls' (canonical, parsed from the text),
    'content' (the text outside the calls) and 'invalid_tool_calls', and finish_reason 'tool_calls' when it
    calls.
    """
    from chattune.inference.toolcalls import parse_tool_calls

    if seed is not None:
        torch.manual_seed(seed)
    device = next(model.parameters()).device
    stops = stop_token_ids(model, tokenizer)
    context = context_length(model.config)
    ids_of = prompt_ids(tokenizer, conversations, tools)
    lengths = [len(x) for x in ids_of]
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
            enc = tokenizer.pad({"input_ids": [ids_of[i] for i in idx]}, padding=True, return_tensors="pt")
            enc = {k: v.to(device) for k, v in enc.items()}
            gen = model.generate(**enc, max_new_tokens=budget, eos_token_id=stops,
                                 pad_token_id=tokenizer.pad_token_id, **sampling_kwargs(temperature, top_p))
            for i, row in zip(idx, gen[:, enc["input_ids"].shape[1]:].tolist()):
                ids, stopped = until_stop(row, stops)
                finish = "stop" if stopped else "length"
                out[i] = {"reply": tokenizer.decode(ids, skip_special_tokens=True), "tokens": len(ids),
                          "finish_reason": finish}
                if tools is not None and tools[i] is not None:  # [] parses calls without rendering tools
                    parsed = parse_tool_calls(out[i]["reply"], id_prefix=f"call_{i}")
                    out[i].update(content=parsed.content, tool_calls=parsed.tool_calls,
                                  invalid_tool_calls=parsed.invalid)
                    if parsed.tool_calls and stopped:
                        out[i]["finish_reason"] = "tool_calls"
    finally:
        tokenizer.padding_side = side
    return out


def check_prompt(messages, tools=None) -> str | None:
    """What is wrong with a conversation to be answered (canonical messages, and its tools), or None; it must
    end with a user turn or tool results."""
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty list of {role, content} objects"
    if not all(isinstance(m, dict) for m in messages):
        return "every message must be an object with 'role' and 'content'"
    if messages[-1].get("role") == "assistant":
        return "the last message is from the assistant: there is nothing to reply to (drop that message)"
    # the training checker wants a final reply; give it a placeholder so it checks everything before it
    return check_messages(list(messages) + [{"role": "assistant", "content": "-"}], tools)
