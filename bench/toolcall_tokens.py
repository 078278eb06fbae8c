"""Whether chattune's template should add <tool_call> and </tool_call> as tokens: what the call tags cost with and
without them, on two byte-level BPE tokenizers.

    python bench/toolcall_tokens.py

- demo: the tokenizer `chattune quickstart --task tools` trains (vocabulary 1000, digits split);
- glaive-bpe: a GPT-2-style byte-level BPE (vocabulary 8000) trained on glaive_toolcall_en_demo.json (../shared/data),
  standing in for gpt2's own, which cannot be downloaded here.
For each: the pieces the two tags split into as text, and the tokens of every assistant call of the data rendered
in chattune's layout, with and without the tags added. Results: bench/results/toolcall_tokens.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "data" / "glaive_toolcall_en_demo.json"


def calls_text(convs) -> list[str]:
    from chattune.data.tools import call_json

    return ["\n".join(f"<tool_call>\n{call_json(c)}\n</tool_call>" for c in m["tool_calls"]) + "<|im_end|>"
            for conv in convs for m in conv if m.get("tool_calls")]


def measure(tok, texts: list[str]) -> dict:
    """Tokens of the calls with only the turn markers added, then with chattune's setup (the tags added too)."""
    import copy

    from chattune.data.template import END_OF_TURN, TURN_START, prepare_tokenizer

    def count(t):
        return sum(len(t(x, add_special_tokens=False)["input_ids"]) for x in texts)

    tags = {tag: tok.convert_ids_to_tokens(tok(tag, add_special_tokens=False)["input_ids"])
            for tag in ("<tool_call>", "</tool_call>")}
    plain = copy.deepcopy(tok)
    plain.add_special_tokens({"additional_special_tokens": [TURN_START, END_OF_TURN]})
    without = count(plain)
    prepare_tokenizer(tok)
    with_tags = count(tok)
    return {"calls": len(texts), "tags_as_text": tags, "call_tokens_without_added_tags": without,
            "call_tokens_with_added_tags": with_tags,
            "tokens_saved_per_call": round((without - with_tags) / len(texts), 2)}


def main() -> None:
    from chattune.data.loading import load_conversations
    from chattune.data.tools import rows_of
    from chattune.demo import assets, tools

    out = {}
    splits = tools.tool_splits(n_train=500, n_test=0)
    demo_convs, _ = rows_of_demo(splits)
    cases = {"demo": (assets.train_tokenizer(list(tools.texts_of(splits)), vocab_size=1000), demo_convs)}
    if SHARED.is_file():
        glaive, _ = rows_of(load_conversations(str(SHARED), "train").dataset[:])
        text = [m["content"] or "" for c in glaive for m in c] + calls_text(glaive)
        cases["glaive-bpe"] = (assets.train_tokenizer(text, vocab_size=8000, split_digits=False), glaive)
    for name, (tok, convs) in cases.items():
        out[name] = measure(tok, calls_text(convs))
    path = HERE / "results" / "toolcall_tokens.json"
    path.write_text(json.dumps(out, indent=2, ensure_ascii=False) + "\n")
    json.dump(out, sys.stdout, indent=2, ensure_ascii=False)


def rows_of_demo(splits):
    """The demo rows (OpenAI's wire shape) as canonical conversations."""
    from chattune.data.formats import from_messages

    rows = [r for rows in splits.values() for r in rows]
    return [from_messages(r, {}) for r in rows], [r["tools"] for r in rows]


if __name__ == "__main__":
    main()
