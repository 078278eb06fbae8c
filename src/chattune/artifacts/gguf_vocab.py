"""The tokenizer half of a GGUF file: tokens, merges, token types, the pre-tokenizer kind, special-token
ids and the chat template, in the keys llama.cpp reads (gguf.Keys.Tokenizer).

llama.cpp re-implements byte-level BPE itself and picks its pre-tokenizer (how text is split before merging)
by name, from `tokenizer.ggml.pre`. Only names whose splitting equals the tokenizer's are written; anything
llama.cpp would split differently stops the export, since the file would load and then chat in wrong tokens.
"""

from __future__ import annotations

import json
import re

import gguf

from chattune.errors import ChattuneError

CHATML_START, CHATML_END = "<|im_start|>", "<|im_end|>"
# GPT-2's regex as tokenizers' ByteLevel(use_regex=True) applies it is llama.cpp's "gpt-2"; its "starcoder"
# splits off every digit first ("\p{N}"), as tokenizers' Digits(individual_digits=True) does
# (llama.cpp src/llama-vocab.cpp, llm_tokenizer_bpe; "refact" and "smollm" split alike, but smollm turns
# clean_spaces off, which the decoded text would show)
_BYTE_LEVEL_KINDS = {(): "gpt-2", ("digits",): "starcoder"}
# Split(regex) + ByteLevel(use_regex=False): the regexes llama.cpp knows by name (Qwen2's and Llama 3's);
# they differ only in how many digits one piece holds
_WORDS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
_REST = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
SPLIT_REGEXES = {_WORDS + r"\p{N}" + _REST: "qwen2", _WORDS + r"\p{N}{1,3}" + _REST: "llama-bpe"}
# llama.cpp looks a whole piece up in the vocabulary before merging for these (ignore_merges in llama-vocab.cpp)
_IGNORE_MERGES = {"llama-bpe"}
_SUPPORTED = "supported: GPT-2's byte-level BPE, with or without one-digit splitting, and Qwen2's or Llama 3's regex"
# transformers' {% generation %} tags mark the trained-on span; they render nothing. Other engines (llama.cpp's
# jinja, LM Studio's) may not know the tag, so it becomes an always-true `if` that keeps its whitespace control
_GENERATION_TAG = re.compile(r"\{%(-?)\s*(end)?generation\s*(-?)%\}")


def tokenizer_spec(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ChattuneError(f"GGUF export needs a fast (tokenizers) tokenizer, got {type(tokenizer).__name__}: "
                            "save the model with its tokenizer.json")
    return json.loads(backend.to_str())


def _pieces(pre: dict | None) -> list[dict]:
    if pre is None:
        return []
    return pre["pretokenizers"] if pre.get("type") == "Sequence" else [pre]


def _short(spec: dict | None) -> str:
    return json.dumps(spec, separators=(",", ":"))[:160]


def _pretokenizer_name(pieces: list[dict]) -> str | None:
    if not pieces or pieces[-1].get("type") != "ByteLevel" or pieces[-1].get("add_prefix_space"):
        return None
    head, byte_level = pieces[:-1], pieces[-1]
    if byte_level.get("use_regex", True):
        kinds = tuple("digits" if p.get("type") == "Digits" and p.get("individual_digits") else _short(p)
                      for p in head)
        return _BYTE_LEVEL_KINDS.get(kinds)
    if len(head) == 1 and head[0].get("type") == "Split" and head[0].get("behavior") == "Isolated":
        return SPLIT_REGEXES.get((head[0].get("pattern") or {}).get("Regex"))
    return None


def llama_cpp_pretokenizer(tokenizer) -> str:
    """The `tokenizer.ggml.pre` name under which llama.cpp splits text exactly as this tokenizer does."""
    spec = tokenizer_spec(tokenizer)
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ChattuneError(f"GGUF export supports byte-level BPE tokenizers only; this one is a {model.get('type')} "
                            f"model (byte_fallback={model.get('byte_fallback')})")
    norm = spec.get("normalizer")
    # NFC is left out as llama.cpp's own converter does for Qwen2; any other normalizer changes the text
    if norm is not None and norm.get("type") != "NFC":
        raise ChattuneError(f"GGUF export: llama.cpp cannot reproduce the tokenizer's normalizer {_short(norm)}")
    name = _pretokenizer_name(_pieces(spec.get("pre_tokenizer")))
    if name is None:
        raise ChattuneError("GGUF export: llama.cpp has no pre-tokenizer matching the tokenizer's "
                            f"{_short(spec.get('pre_tokenizer'))} ({_SUPPORTED})")
    if bool(model.get("ignore_merges")) != (name in _IGNORE_MERGES):
        raise ChattuneError(f"GGUF export: llama.cpp's {name!r} pre-tokenizer has ignore_merges="
                            f"{name in _IGNORE_MERGES}, this tokenizer {bool(model.get('ignore_merges'))}")
    return name


def end_of_turn_id(model, tokenizer) -> int:
    """The token the model ends a reply with: generation_config's eos (of a list, ChatML's <|im_end|> wins),
    else the tokenizer's eos."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    candidates = [i for i in (ids if isinstance(ids, list) else [ids]) + [tokenizer.eos_token_id] if i is not None]
    if not candidates:
        raise ChattuneError("GGUF export: the model has no end-of-sequence token (set eos_token_id in "
                            "generation_config.json or eos_token in tokenizer_config.json)")
    im_end = tokenizer.get_vocab().get(CHATML_END)
    return im_end if im_end in candidates else candidates[0]


def gguf_chat_template(template) -> str | None:
    """The template as written to the file: the default of several named ones, generation tags neutralised."""
    if isinstance(template, dict):  # several named templates: runtimes read the default one
        template = template.get("default")
    if not template:
        return None
    return _GENERATION_TAG.sub(lambda m: "{%" + m[1] + (" endif " if m[2] else " if true ") + m[3] + "%}", template)


def _adds_bos_eos(tokenizer) -> tuple[bool, bool]:
    """Whether encoding adds BOS / EOS by itself (GPT-2's tokenizers add neither)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    longer = len(full) > len(plain)
    return (longer and full[0] == tokenizer.bos_token_id and full[0] not in plain[:1],
            longer and full[-1] == tokenizer.eos_token_id and full[-1] not in plain[-1:])


def token_table(tokenizer, n_vocab: int, spec: dict) -> tuple[list[str], list[int]]:
    """One token and one type per embedding row: added special tokens are CONTROL (llama.cpp hides them in
    text and matches them whole), other added tokens USER_DEFINED, rows past the tokenizer UNUSED."""
    vocab = tokenizer.get_vocab()
    if len(vocab) > n_vocab:
        raise ChattuneError(f"GGUF export: the tokenizer has {len(vocab)} tokens but the model's embedding only "
                            f"{n_vocab} rows: resize the embeddings (model.resize_token_embeddings) and save again")
    by_id = {i: t for t, i in vocab.items()}
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:  # a padded vocabulary's spare rows: never produced, never decoded
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(by_id[i])
        if i not in added:
            types.append(gguf.TokenType.NORMAL)
        else:
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
    return tokens, types


def add_vocab(writer: gguf.GGUFWriter, model, tokenizer, n_vocab: int) -> None:
    """Write the tokenizer, its special-token ids (eos = the end-of-turn token) and the chat template."""
    spec = tokenizer_spec(tokenizer)
    tokens, types = token_table(tokenizer, n_vocab, spec)
    writer.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    writer.add_tokenizer_pre(llama_cpp_pretokenizer(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # tokenizers writes merges as "a b" strings (older) or [a, b] pairs (newer)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])])
    add_bos, add_eos = _adds_bos_eos(tokenizer)
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(add_eos)
    writer.add_eos_token_id(end_of_turn_id(model, tokenizer))
    for kind, value in (("bos", tokenizer.bos_token_id), ("pad", tokenizer.pad_token_id),
                        ("unk", tokenizer.unk_token_id)):
        if value is not None:
            getattr(writer, f"add_{kind}_token_id")(value)
    template = gguf_chat_template(getattr(tokenizer, "chat_template", None))
    if template:
        writer.add_chat_template(template)
