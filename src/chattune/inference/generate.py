"""Generation: conversations to assistant replies, formatted with the chat template saved at training
time, stopping at the end-of-turn token; `chattune generate`, `eval --samples` and the report use it."""

from __future__ import annotations

import logging

import torch

from chattune.data.template import sandbox_errors
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
    with sandbox_errors(tokenizer):  # the first render of every generation: a blocked template stops here
        if not tools or not any(tools):
            enc = tokenizer.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True,
                                                return_dict=True)
            return [list(ids) for ids in enc["input_ids"]]
        return [list(tokenizer.apply_chat_template(c, tools=t or None, add_generation_prompt=True, tokenize=True,
                                                   return_dict=True)["input_ids"])
                for c, t in zip(conversations, tools)]


def prompt_lengths(tokenizer, conversations: list[list[dict]], tools: list | None = None) -> list[int]:
    return [len(ids) for ids in prompt_ids(tokenizer, conversations, tools)]


def fit_prompt(tokenizer, conversation: list[dict], limit: int, tools: list | None = None
               ) -> tuple[list[dict], str | None]:
    """The conversation cut from the left to at most `limit` prompt tokens, and a note saying what was cut
    ('the oldest 2 message(s) left out'; None when it fits as it is). The oldest messages go first, the
    system prompt stays while it fits with the rest, and a last message too long alone keeps its end (what
    the reply answers). Transformers has no such helper: its truncation cuts token ids, which would leave a
    broken chat template. tools: the conversation's tool definitions, which every cut keeps."""
    t = [tools] if tools else None
    if prompt_lengths(tokenizer, [conversation], t)[0] <= limit:
        return conversation, None
    system = conversation[:1] if conversation[0].get("role") == "system" else []
    turns = conversation[len(system):]
    # newest first: keep as many recent messages as fit, starting at a user turn where there is one
    starts = [s for s in range(1, len(turns)) if turns[s].get("role") == "user" or s == len(turns) - 1]
    for s in starts:
        if prompt_lengths(tokenizer, [system + turns[s:]], t)[0] <= limit:
            return system + turns[s:], f"the oldest {s} message(s) left out"
    last = turns[-1]
    left_out = " and ".join(([f"the {len(turns) - 1} earlier message(s)"] if len(turns) > 1 else [])
                            + (["the system prompt"] if system else []))
    if prompt_lengths(tokenizer, [[last]], t)[0] <= limit:
        return [last], f"{left_out} left out"
    return [_keep_end(tokenizer, last, limit, t)], "; ".join(([f"{left_out} left out"] if left_out else [])
                                                          + ["the last message cut to its final tokens"])


def _keep_end(tokenizer, message: dict, limit: int, t: list | None = None) -> dict:
    """The message with its content cut from the start so that the prompt holds at most `limit` tokens."""
    overhead = prompt_lengths(tokenizer, [[{**message, "content": ""}]], t)[0]
    ids = tokenizer(message["content"], add_special_tokens=False)["input_ids"]
    keep = limit - overhead
    while keep > 0:
        cut = {**message, "content": tokenizer.decode(ids[-keep:])}
        over = prompt_lengths(tokenizer, [[cut]], t)[0] - limit
        if over <= 0:
            return cut
        keep -= over  # decoding and encoding again can merge or split tokens at the cut
    raise ChattuneError(f"the model's context cannot hold even the chat template around one message ({limit} "
                        "tokens left for the prompt); use a model with a longer context")


@torch.no_grad()
def generate_replies(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int = 64,
                     batch_size: int = 16, temperature: float = 0.0, top_p: float = 1.0,
                     seed: int | None = None, fit: str = "error", tools: list | None = None) -> list[dict]:
    """One reply per conversation, in input order: {'reply', 'tokens', 'finish_reason'}.

    Conversations are batched by prompt length (less padding), left-padded, and end at the end-of-turn
    token; greedy when temperature is 0. A batch that would run past the model's context gets fewer new
    tokens (finish_reason 'length'). A prompt that leaves no room for a reply stops with one line, or with
    fit='left' (sample replies to data set conversations) is cut from the left by fit_prompt to leave room
    for max_new_tokens (at most half the context), leaving out tool definitions that alone do not fit; each
    reply then says what was cut in 'cut' (or None).
    tools: each conversation's tool definitions (or None; by default a data.tools.Conversation's own); a
    reply to a conversation with tools (a list, [] included) also has 'tool_calls' (canonical, parsed from the
    text), 'content' (the text outside the calls) and 'invalid_tool_calls', and finish_reason 'tool_calls' when
    it calls.
    """
    from chattune.inference.toolcalls import parse_tool_calls

    if fit not in ("error", "left"):
        raise ValueError(f"fit must be 'error' or 'left', not {fit!r}")
    if tools is None and any(getattr(c, "tools", None) for c in conversations):  # data.tools.Conversation
        tools = [getattr(c, "tools", None) for c in conversations]
    if seed is not None:
        torch.manual_seed(seed)
    device = next(model.parameters()).device
    stops = stop_token_ids(model, tokenizer)
    context = context_length(model.config)
    cuts: list[str | None] = [None] * len(conversations)
    if fit == "left" and context is not None:
        limit = context - min(max_new_tokens, context // 2)
        conversations, tools = list(conversations), list(tools) if tools else tools
        for i, conv in enumerate(conversations):
            try:
                conversations[i], cuts[i] = fit_prompt(tokenizer, conv, limit, tools[i] if tools else None)
            except ChattuneError:
                if not (tools and tools[i]):
                    raise
                # the tool definitions alone fill the context: leave them out ([] still parses calls)
                conversations[i], cut = fit_prompt(tokenizer, conv, limit)
                tools[i], cuts[i] = [], "; ".join(["the tool definitions left out"] + ([cut] if cut else []))
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
                          "finish_reason": finish, **({"cut": cuts[i]} if fit == "left" else {})}
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
