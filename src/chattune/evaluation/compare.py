"""A model against a baseline (usually the model it was fine-tuned from) on the very same token sequences,
with the baseline's replies to sample prompts: the "before" of the run report and of `chattune eval`."""

from __future__ import annotations

import gc

from chattune.data.tokenize import prepare_split
from chattune.inference.generate import generate_replies
from chattune.model.load import load_baseline
from chattune.training.metrics import check_aligned, score_rows


def score_baseline(name: str, reference_tokenizer, conversations, kind: str, rows, max_length: int, batch_size: int,
                   device: str, seed: int = 42, template_file: str | None = None, prompts=(), sample_tokens: int = 64,
                   check_rows: int | None = None, reference_name: str = "the fine-tuned model") -> dict:
    """Score baseline `name` on `rows` (the reference's tokenized `conversations`) and answer `prompts`.

    The baseline is set up as training set up its base (template, added tokens, seeded rows) and must
    split the conversations into the same tokens (all of them, or the first `check_rows`), or per-token
    losses would not compare."""
    model, tokenizer = load_baseline(name, reference_tokenizer, device, seed=seed, template_file=template_file)
    probe = conversations if check_rows is None else conversations.select(range(min(check_rows, len(conversations))))
    mine = rows if check_rows is None else prepare_split(probe, reference_tokenizer, max_length, kind)[0]
    theirs, _ = prepare_split(probe, tokenizer, max_length, kind)
    check_aligned(mine, theirs, reference_tokenizer, reference_name, name)
    stats = score_rows(model, rows, tokenizer.pad_token_id, batch_size)
    replies = generate_replies(model, tokenizer, [p for p, _ in prompts], sample_tokens, fit="left") if prompts else []
    del model
    gc.collect()
    return {"model": name, **stats, "sample_replies": [r["reply"] for r in replies]}
