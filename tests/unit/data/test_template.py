"""Formatting and loss masks, asserted as exact token and label lists on a tiny tokenizer."""

from __future__ import annotations

import pytest
from datasets import Dataset

from chattune.data.template import END_OF_TURN, has_generation_tags, prepare_tokenizer, render, render_with_spans
from chattune.data.tokenize import encode_conversations, prepare_split
from chattune.errors import ChattuneError
from chattune.outputs import IGNORE_INDEX

CONV = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hi there"},
    {"role": "assistant", "content": "hello"},
    {"role": "user", "content": "what is 12 + 34"},
    {"role": "assistant", "content": "12 + 34 = 46."},
]

EXPECTED_TOKENS = [
    "<|im_start|>", "s", "y", "s", "t", "e", "m", "Ċ", "be", "Ġbrief", "<|im_end|>", "Ċ",
    "<|im_start|>", "u", "s", "e", "r", "Ċ", "hi", "Ġthere", "<|im_end|>", "Ċ",
    "<|im_start|>", "a", "s", "s", "is", "t", "a", "n", "t", "Ċ", "hello", "<|im_end|>", "Ċ",
    "<|im_start|>", "u", "s", "e", "r", "Ċ", "what", "Ġis", "Ġ", "1", "2", "Ġ+", "Ġ", "3", "4", "<|im_end|>", "Ċ",
    "<|im_start|>", "a", "s", "s", "is", "t", "a", "n", "t", "Ċ",
    "1", "2", "Ġ+", "Ġ", "3", "4", "Ġ=", "Ġ", "4", "6", ".", "<|im_end|>", "Ċ",
]
# positions (in EXPECTED_TOKENS) whose label is the token itself; every other label is -100
LOSS_POSITIONS = [32, 33] + list(range(62, 74))


def test_template_added_to_gpt2_like_tokenizer(tiny_tokenizer):
    assert tiny_tokenizer.chat_template is None and tiny_tokenizer.pad_token is None
    setup = prepare_tokenizer(tiny_tokenizer)
    assert setup.source == "chattune"
    assert tiny_tokenizer.eos_token == END_OF_TURN == setup.end_of_turn
    assert tiny_tokenizer.pad_token == "<|endoftext|>" != tiny_tokenizer.eos_token
    assert has_generation_tags(tiny_tokenizer.chat_template)


def test_exact_tokens_and_labels(tiny_tokenizer):
    prepare_tokenizer(tiny_tokenizer)
    out = encode_conversations(tiny_tokenizer, [CONV])
    ids, labels = out["input_ids"][0], out["labels"][0]
    assert tiny_tokenizer.convert_ids_to_tokens(ids) == EXPECTED_TOKENS
    expected_labels = [ids[i] if i in LOSS_POSITIONS else IGNORE_INDEX for i in range(len(ids))]
    assert labels == expected_labels
    # both replies end with the end-of-turn token, and it carries loss
    eot = tiny_tokenizer.convert_tokens_to_ids(END_OF_TURN)
    assert [labels[33], labels[73]] == [eot, eot] and labels[74] == IGNORE_INDEX
    assert out["length"] == [len(EXPECTED_TOKENS)]


def test_mask_equals_transformers_assistant_mask(tiny_tokenizer):
    prepare_tokenizer(tiny_tokenizer)
    convs = [CONV, CONV[1:3], [{"role": "user", "content": "what is up"}, {"role": "assistant", "content": "be kind"}]]
    ours = encode_conversations(tiny_tokenizer, convs)
    for conv, ids, labels in zip(convs, ours["input_ids"], ours["labels"]):
        ref = tiny_tokenizer.apply_chat_template(conv, tokenize=True, return_dict=True,
                                                 return_assistant_tokens_mask=True)
        assert ref["input_ids"] == ids
        assert ref["assistant_masks"] == [int(lab != IGNORE_INDEX) for lab in labels]


def test_generation_prompt_and_saved_template_round_trip(tiny_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    prepare_tokenizer(tiny_tokenizer)
    tiny_tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    prompt = render(reloaded, [CONV[:2]], add_generation_prompt=True)[0]
    assert prompt.endswith("<|im_start|>assistant\n")
    assert reloaded.apply_chat_template(CONV, tokenize=True, return_dict=True)["input_ids"] == \
        encode_conversations(tiny_tokenizer, [CONV])["input_ids"][0]
    assert reloaded.eos_token == END_OF_TURN and reloaded.pad_token == tiny_tokenizer.pad_token


def test_truncation_drops_rows_without_assistant_tokens(tiny_tokenizer):
    prepare_tokenizer(tiny_tokenizer)
    ds = Dataset.from_dict({"messages": [CONV, CONV[1:3]]})
    rows, stats = prepare_split(ds, tiny_tokenizer, max_length=30)
    # CONV's first reply starts at token 32, so at 30 tokens it has no loss token left; the short one keeps its reply
    assert stats.dropped_no_loss == 1 and stats.rows_out == 1 and len(rows) == 1
    assert stats.truncated == 1
    assert all(len(x) <= 30 for x in rows["input_ids"])
    assert any(lab != IGNORE_INDEX for lab in rows["labels"][0])


MODEL_TEMPLATE = (  # a model's own template without generation tags (Zephyr-like)
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + eos_token + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def test_model_template_is_kept_and_replies_found_without_tags(tiny_tokenizer):
    tiny_tokenizer.chat_template = MODEL_TEMPLATE
    setup = prepare_tokenizer(tiny_tokenizer)
    assert setup.source == "model" and tiny_tokenizer.chat_template == MODEL_TEMPLATE
    assert tiny_tokenizer.pad_token is not None and tiny_tokenizer.pad_token != tiny_tokenizer.eos_token
    texts, spans = render_with_spans(tiny_tokenizer, [CONV])
    replies = [texts[0][a:b] for a, b in spans[0]]
    eos = tiny_tokenizer.eos_token
    assert replies == [f"hello{eos}\n", f"12 + 34 = 46.{eos}\n"]


def test_template_that_rewrites_history_is_refused(tiny_tokenizer):
    # drops all but the last assistant message, like templates that strip earlier reasoning
    tiny_tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}{{ m['role'] + ': ' + m['content'] + "
        "'\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    prepare_tokenizer(tiny_tokenizer)
    with pytest.raises(ChattuneError, match="rewrites earlier turns"):
        render_with_spans(tiny_tokenizer, [CONV])
