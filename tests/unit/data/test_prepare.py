"""Fast preparation gives exactly the tokens and labels of transformers' own chat-template path, and a
second run with the same inputs reads them from the cache."""

from __future__ import annotations

import json
import random

import pytest
from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast
from transformers.utils.chat_template_utils import render_jinja_template

from chattune.config import Config, validate
from chattune.data.loading import canonical_features
from chattune.data.prepared import cache_root, prepare_training_data
from chattune.data.template import chattune_template, prepare_tokenizer, render_chatml, render_chatml_columns
from chattune.data.tokenize import Encoder, prefix_safe, prepare_split
from chattune.data.tools import to_arrow
from chattune.data.validate import check_messages
from chattune.outputs import IGNORE_INDEX

WORDS = ["hi", "there", "the", "sky", "is", "blue", "12", "+", "34", "=", "46.", "you", "are", "kind", "what", "up",
         "  ", "\n", "\n\n", "\t", "héllo", "日本語", "{{ x }}", "{% if %}", "<|im_end", "'s", "don't", "!!", " "]


def random_conversations(n: int, seed: int = 0, max_words: int = 60, tools: bool = False):
    """Random conversations; with tools, (conversations, each one's tools) where about half declare tools and
    assistant turns call them (with or without text before the calls, one or two calls, results after)."""
    rng = random.Random(seed)

    def text():
        n = rng.randint(1, max_words)
        return "".join(rng.choice(WORDS) + rng.choice([" ", " ", "", "  ", "\n"]) for _ in range(n))

    def call():
        args = {rng.choice(WORDS): rng.choice([text(), rng.randint(-5, 99), [text()], {"k": text()}])
                for _ in range(rng.randint(0, 3))}
        return {"id": f"c{rng.randint(0, 999)}", "type": "function", "function": {"name": rng.choice(WORDS),
                                                                                  "arguments": args}}

    convs, all_tools = [], []
    for _ in range(n):
        conv = [{"role": "system", "content": text()}] if rng.random() < 0.3 else []
        for _ in range(rng.randint(1, 3)):
            conv.append({"role": "user", "content": text()})
            if tools and rng.random() < 0.5:
                calls = [call() for _ in range(rng.randint(1, 2))]
                conv.append({"role": "assistant", "content": rng.choice(["", text()]), "tool_calls": calls})
                conv += [{"role": "tool", "content": text(), "tool_call_id": c["id"]} for c in calls]
            conv.append({"role": "assistant", "content": text()})
        convs.append(conv)
        all_tools.append([{"type": "function", "function": {"name": rng.choice(WORDS), "description": text(),
                                                            "parameters": {"type": "object"}}}]
                         if rng.random() < 0.5 else None)
    return (convs, all_tools) if tools else convs


def tool_dataset(convs, tools) -> Dataset:
    """Conversations with tools stored as the loaders store them (the wide canonical schema)."""
    pairs = [to_arrow(c, t) for c, t in zip(convs, tools)]
    return Dataset.from_dict({"messages": [m for m, _ in pairs], "tools": [t for _, t in pairs]},
                             features=canonical_features("messages", tools=True))


def byte_level_tokenizer(texts, normalizer=None, pre=None) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre or pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def reference(tokenizer, conv, max_length, tools=None):
    enc = tokenizer.apply_chat_template(conv, tools=tools, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    ids, mask = enc["input_ids"], enc["assistant_masks"]
    if max_length:
        ids, mask = ids[:max_length], mask[:max_length]
    return ids, [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]


def test_python_chatml_renderer_equals_the_jinja_template():
    convs = random_conversations(200, seed=1)
    texts, spans = render_chatml(convs)
    ref_texts, ref_spans = render_jinja_template(conversations=convs, chat_template=chattune_template(),
                                                 return_assistant_tokens_mask=True)
    assert texts == ref_texts and spans == [list(s) for s in ref_spans]


def test_python_chatml_renderer_equals_the_jinja_template_with_tools():
    convs, tools = random_conversations(200, seed=11, tools=True)
    texts, spans = render_chatml(convs, tools)
    for conv, t, text, span in zip(convs, tools, texts, spans):
        ref_text, ref_span = render_jinja_template(conversations=[conv], tools=t, chat_template=chattune_template(),
                                                   return_assistant_tokens_mask=True)
        assert text == ref_text[0] and span == [tuple(x) for x in ref_span[0]]
    for prompt in (True, False):  # the generation prompt after tool results opens the assistant's turn
        conv = convs[next(i for i, c in enumerate(convs) if any(m["role"] == "tool" for m in c))]
        last_tool = max(i for i, m in enumerate(conv) if m["role"] == "tool")
        rendered = render_jinja_template(conversations=[conv[:last_tool + 1]], chat_template=chattune_template(),
                                         add_generation_prompt=prompt)[0][0]
        assert rendered.endswith("</tool_response><|im_end|>\n" + ("<|im_start|>assistant\n" if prompt else ""))


@pytest.mark.parametrize("with_tools", [False, True])
def test_budgeted_rendering_is_an_exact_prefix_ending_at_a_cut_point(with_tools):
    convs, tools = random_conversations(100, seed=7, tools=True) if with_tools else \
        (random_conversations(100, seed=7), None)
    convs = convs + [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "the sky is blue"}]]
    tools = tools + [None] if tools else None
    full, full_spans = render_chatml(convs, tools)
    roles = [m["role"] for c in convs for m in c]
    contents = [m["content"] for c in convs for m in c]
    calls = [m.get("tool_calls") for c in convs for m in c] if with_tools else None
    bounds = [0]
    for c in convs:
        bounds.append(bounds[-1] + len(c))
    texts, spans, partial = render_chatml_columns(roles, contents, bounds, 150, calls, tools)
    assert any(partial) and not all(partial)
    for text, whole, s, ws, cut in zip(texts, full, spans, full_spans, partial):
        assert whole.startswith(text) and (cut or text == whole)
        if cut:
            assert len(text) >= 150 and whole[len(text)] == " " and not text[-1].isspace()
        assert s == [(a, min(b, len(text))) for a, b in ws if a < len(text)]


def test_prefix_rule_holds_only_for_tokenizers_that_split_at_spaces(tiny_tokenizer):
    texts = [" ".join(WORDS)] * 4
    assert prefix_safe(tiny_tokenizer)  # digits + byte-level, like the quickstart's
    assert prefix_safe(byte_level_tokenizer(texts))
    assert not prefix_safe(byte_level_tokenizer(texts, normalizer=normalizers.NFKC()))
    assert not prefix_safe(byte_level_tokenizer(texts, pre=pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                    use_regex=False)))


@pytest.mark.parametrize("which", ["digits+byte-level", "byte-level", "normalized"])
@pytest.mark.parametrize("max_length", [None, 7, 40, 150])
def test_rows_equal_transformers_assistant_mask_truncated(tiny_tokenizer, which, max_length):
    convs = random_conversations(60, seed=2)
    texts = [m["content"] for c in convs for m in c]
    tok = {"digits+byte-level": tiny_tokenizer, "byte-level": byte_level_tokenizer(texts),
           "normalized": byte_level_tokenizer(texts, normalizer=normalizers.Lowercase())}[which]
    prepare_tokenizer(tok)
    rows, stats = prepare_split(Dataset.from_dict({"messages": convs}), tok, max_length, batch_size=16, num_proc=None)
    expected = [reference(tok, c, max_length) for c in convs]
    kept = [e for e in expected if any(lab != IGNORE_INDEX for lab in e[1])]
    assert list(zip(rows["input_ids"], rows["labels"])) == [tuple(e) for e in kept]
    assert stats.dropped_no_loss == len(expected) - len(kept)
    full = [len(tok.apply_chat_template(c, tokenize=True, return_dict=True)["input_ids"]) for c in convs]
    assert stats.truncated == sum(max_length is not None and n > max_length for n in full)


@pytest.mark.parametrize("max_length", [None, 60])
def test_tool_rows_equal_transformers_assistant_mask(tiny_tokenizer, max_length):
    convs, tools = random_conversations(40, seed=12, tools=True)
    prepare_tokenizer(tiny_tokenizer)
    rows, _ = prepare_split(tool_dataset(convs, tools), tiny_tokenizer, max_length, batch_size=16, num_proc=None)
    expected = [reference(tiny_tokenizer, c, max_length, t) for c, t in zip(convs, tools)]
    kept = [e for e in expected if any(lab != IGNORE_INDEX for lab in e[1])]
    assert list(zip(rows["input_ids"], rows["labels"])) == [tuple(e) for e in kept]


def test_short_prefixes_continue_where_they_stopped(tiny_tokenizer):
    prepare_tokenizer(tiny_tokenizer)
    texts, spans = render_chatml(random_conversations(30, seed=3, max_words=200))
    enc = Encoder(tiny_tokenizer, 300)
    enc.chars_per_token = 0.05  # forces many short passes per text
    ids, _, over = enc.tokens(texts)
    whole = [e.ids for e in tiny_tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]
    assert ids == [w[:300] for w in whole] and over == [len(w) > 300 for w in whole]
    assert enc.prefix  # the per-batch check found nothing wrong


def test_a_tokenizer_breaking_the_prefix_rule_is_caught_and_tokenized_whole(monkeypatch, caplog):
    # byte-level BPE without the regex split learns merges across spaces ("abĠab"), so a text cut at a
    # space tokenizes differently from the whole text
    tok = byte_level_tokenizer(["ab " * 64, "cd ab " * 32],
                               pre=pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    prepare_tokenizer(tok)
    monkeypatch.setattr("chattune.data.tokenize.prefix_safe", lambda t: True)  # pretend, to exercise the safety net
    convs = [[{"role": "user", "content": "ab " * 40 + "cd"}, {"role": "assistant", "content": "cd ab " * 30}]] * 3
    with caplog.at_level("WARNING", logger="chattune"):
        rows, _ = prepare_split(Dataset.from_dict({"messages": convs}), tok, 40, num_proc=None)
    assert "tokenizing whole texts from here on" in caplog.text
    expected = [reference(tok, c, 40) for c in convs]
    assert len(rows) == 3 and list(zip(rows["input_ids"], rows["labels"])) == [tuple(e) for e in expected]


def test_worker_processes_give_the_same_rows(tiny_tokenizer):
    prepare_tokenizer(tiny_tokenizer)
    ds = Dataset.from_dict({"messages": random_conversations(200, seed=5)})
    one, _ = prepare_split(ds, tiny_tokenizer, 50, batch_size=32, num_proc=None)
    two, _ = prepare_split(ds, tiny_tokenizer, 50, batch_size=32, num_proc=2)
    assert one["input_ids"] == two["input_ids"] and one["labels"] == two["labels"]


def _cfg(dataset, model_dir, out) -> Config:
    cfg = Config()
    cfg.model.name, cfg.data.dataset, cfg.data.skip_invalid, cfg.train.output_dir = str(model_dir), str(dataset), \
        True, str(out)
    return validate(cfg)


def test_second_run_reads_the_cache_and_changes_invalidate_it(tmp_path, model_dir, tiny_tokenizer, caplog,
                                                              prepared_cache):
    assert cache_root().is_relative_to(prepared_cache)  # tests never write to the user's cache
    rows = [{"messages": c} for c in random_conversations(40, seed=6)] + [{"messages": []}]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prepare_tokenizer(tiny_tokenizer)
    out = tmp_path / "out"
    out.mkdir()
    cfg = _cfg(data, model_dir, out)
    first = prepare_training_data(cfg, tiny_tokenizer, 64, out)
    (out / "rejected.jsonl").unlink()
    with caplog.at_level("INFO", logger="chattune"):
        second = prepare_training_data(cfg, tiny_tokenizer, 64, out)
    assert not first.from_cache and second.from_cache
    assert "prepared data loaded from cache" in caplog.text
    assert second.train_rows["input_ids"] == first.train_rows["input_ids"]
    assert second.train_rows["labels"] == first.train_rows["labels"]
    assert vars(second.train_stats) == vars(first.train_stats)
    invalid = sum(check_messages(r["messages"]) is not None for r in rows)  # the empty row, and any blank text
    assert len((out / "rejected.jsonl").read_text().splitlines()) == invalid >= 1  # restored from the cache entry
    assert second.train_split.dataset[0]["messages"] == rows[0]["messages"]  # a preview for the run report
    assert not prepare_training_data(cfg, tiny_tokenizer, 100, out).from_cache  # another max length
    data.write_text("".join(json.dumps(r) + "\n" for r in rows[1:]))  # the data changed
    third = prepare_training_data(cfg, tiny_tokenizer, 64, out)
    assert not third.from_cache and third.train_stats.rows_in == first.train_stats.rows_in - 1
    cfg.data.cache = False
    assert not prepare_training_data(cfg, tiny_tokenizer, 64, out).from_cache
