"""Preference data (DPO): TRL's shapes to one canonical pair, row checks with reasons, and tokenization.

Canonical pair: {"prompt": [messages...], "chosen": [assistant message], "rejected": [assistant message]}.
Accepted shapes, detected per row from the values (a data set's extra columns do not matter):
  explicit prompt   prompt: [messages], chosen / rejected: [assistant message(s)]     (TRL conversational)
  implicit prompt   chosen / rejected: whole conversations sharing everything but the last reply
                    (HuggingFaceH4/ultrafeedback_binarized; its string `prompt` column repeats the
                    first user turn and is not used)
  plain strings     prompt, chosen, rejected strings: a user turn and two assistant replies

A split is loaded and checked like chat data (loading.py): problems are counted by kind with the fix, and
named by file and line or row; `skip_invalid` keeps the valid pairs and the rest go to rejected.jsonl.

Tokenization follows inference: prompt ids are the chat template's rendering of the prompt with the generation
prompt, reply ids the reply with its end-of-turn token (what the model emits to stop; not the template's newline
after it). Truncation keeps the replies: the prompt is cut from the left, and every cut is counted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields

from chattune.data.loading import LoadedSplit, Problem, canonical_features, report
from chattune.data.sources import load_parts
from chattune.data.template import render, render_with_spans
from chattune.data.validate import Reason, RowError, check_messages
from chattune.errors import DataError

FORMAT = "preference"
PAIR_COLUMNS = ("prompt", "chosen", "rejected")
TOKEN_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


def is_preference_data(column_names, columns: dict | None = None) -> bool:
    """Whether a source's columns are preference pairs (chosen and rejected)."""
    c = columns or {}
    return all(c.get(n, n) in set(column_names) for n in ("chosen", "rejected"))


def _listish(value, name: str):
    """A list of messages; CSV cells hold JSON strings, so a string that looks like a list is read as one."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            return json.loads(value)
        except ValueError:
            raise RowError("malformed row", f"'{name}' is a string that is not valid JSON") from None
    return value


def _is_messages(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) and "role" in m for m in value)


def _messages(value) -> list[dict]:
    return [{"role": m.get("role"), "content": m.get("content")} for m in value]


def _reply(messages: list[dict], name: str) -> list[dict]:
    if messages[-1].get("role") != "assistant":
        raise RowError("not ending with an assistant reply",
                       f"{name} does not end with an assistant reply (last role: {messages[-1].get('role')!r})")
    return [messages[-1]]


def to_pair(row: dict, columns: dict | None = None) -> dict:
    """One row of any accepted shape to the canonical pair; raises RowError with the reason."""
    c = columns or {}
    value = {n: row.get(c.get(n, n)) for n in PAIR_COLUMNS}
    for name in ("chosen", "rejected"):
        if value[name] is None or value[name] == []:
            raise RowError(f"missing {name}", f"the row has no {name} reply")
    chosen, rejected = _listish(value["chosen"], "chosen"), _listish(value["rejected"], "rejected")
    prompt = _listish(value["prompt"], "prompt")
    if isinstance(chosen, str) and isinstance(rejected, str):
        if not isinstance(prompt, str):
            raise RowError("no prompt", "chosen and rejected are strings but the row has no prompt string")
        return {"prompt": [{"role": "user", "content": prompt}], "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}]}
    if not (_is_messages(chosen) and _is_messages(rejected)):
        raise RowError("malformed row", "chosen and rejected must both be strings or both lists of "
                                        "{role, content} messages")
    chosen, rejected = _messages(chosen), _messages(rejected)
    if _is_messages(prompt):  # explicit prompt: chosen/rejected hold the reply
        return {"prompt": _messages(prompt), "chosen": _reply(chosen, "chosen"),
                "rejected": _reply(rejected, "rejected")}
    # implicit prompt: whole conversations that differ only in the last reply
    c_reply, r_reply = _reply(chosen, "chosen"), _reply(rejected, "rejected")
    if chosen[:-1] != rejected[:-1]:
        at = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b), min(len(chosen), len(rejected)))
        raise RowError("prompts differ", f"chosen and rejected differ before their last reply (from message {at})")
    if len(chosen) < 2:
        raise RowError("no prompt", "chosen and rejected hold only a reply and the row has no prompt messages")
    return {"prompt": chosen[:-1], "chosen": c_reply, "rejected": r_reply}


def check_pair(pair: dict) -> Reason | None:
    """The first problem with a canonical pair, or None."""
    for name in ("chosen", "rejected"):
        reason = check_messages(pair["prompt"] + pair[name])
        if reason is not None:
            where = "prompt" if _blames_prompt(reason, len(pair["prompt"])) else name
            return Reason(reason.kind, f"{where}: {reason}")
    if pair["chosen"][0]["content"].strip() == pair["rejected"][0]["content"].strip():
        return Reason("identical chosen and rejected", "chosen and rejected replies are the same text")
    return None


def _blames_prompt(reason: str, n_prompt: int) -> bool:
    words = reason.split()
    return len(words) > 1 and words[0] == "message" and words[1].rstrip(":").isdigit() and \
        int(words[1].rstrip(":")) < n_prompt


def to_canonical_pair(row, columns: dict | None = None) -> tuple[dict | None, Reason | None]:
    """(pair, None) for a usable row, (None, Reason) for one that is not."""
    if not isinstance(row, dict):
        return None, Reason("malformed row", f"the row is {type(row).__name__}, expected an object")
    try:
        pair = to_pair(row, columns)
    except RowError as e:
        return None, Reason(e.kind, str(e))
    reason = check_pair(pair)
    return (None, reason) if reason else (pair, None)


# ultrafeedback_binarized's split names, used when a source has them and no split was given
PREFERENCE_SPLITS = ("train_prefs", "test_prefs")


def default_splits(d) -> str | None:
    """Set data.train_split / eval_split (a DataConfig) to ultrafeedback_binarized's train_prefs / test_prefs when
    the one --dataset has them, has no 'train' split, and no split was given; returns a note for the log."""
    from chattune.data.sources import list_splits

    if not d.dataset or d.datasets or d.train_split != "train":
        return None
    available = list_splits(d.dataset, d.config_name, d.revision)
    if "train" in available or PREFERENCE_SPLITS[0] not in available:
        return None
    d.train_split = PREFERENCE_SPLITS[0]
    if d.eval_split is None and not d.eval_fraction and PREFERENCE_SPLITS[1] in available:
        d.eval_split = PREFERENCE_SPLITS[1]
    return f"splits: train {d.train_split}, eval {d.eval_split or 'none'} (the data set's preference splits)"


def is_preference_config(cfg) -> bool:
    """Whether a run's (first) source holds preference pairs; its splits default as default_splits says."""
    from chattune.data.mixture import sources

    default_splits(cfg.data)
    spec = sources(cfg.data)[0]
    return is_preference_data(preference_columns(spec.dataset, spec.split, spec.config_name, spec.revision),
                              spec.columns)


def _columns(part) -> list[str]:
    if part.rows is not None:
        return sorted({k for r in part.rows[:100] if isinstance(r, dict) for k in r})
    return list(part.dataset.column_names)


def preference_columns(source: str, split: str, config_name=None, revision=None) -> list[str]:
    """The column names of a split's first part (to tell preference data from chat data)."""
    return _columns(load_parts(source, split, config_name, revision)[0])


def load_preferences(source: str, split: str, fmt: str = "auto", columns: dict | None = None,
                     config_name: str | None = None, revision: str | None = None, skip_invalid: bool = False,
                     max_samples: int | None = None, strict_tools: bool = False) -> LoadedSplit:
    """One split of a source as canonical pairs, every row checked (load_conversations' signature, so the
    mixture code reads preference sources as it reads chat ones; `fmt` and `strict_tools` are accepted for that
    signature: pairs are compared as role/content messages)."""
    from datasets import Dataset

    columns = columns or {}
    name = f"{source} [{split}]"
    pairs, problems, read = [], [], 0
    for part in load_parts(source, split, config_name, revision):
        limit = None if max_samples is None else max_samples - read
        if limit is not None and limit <= 0:
            break
        if not is_preference_data(_columns(part), columns):
            raise DataError(f"{part.label}: preference data needs 'chosen' and 'rejected' columns (and a 'prompt' "
                            f"unless they are whole conversations), found {_columns(part)}")
        n = len(part.rows if part.rows is not None else part.dataset)
        n = n if limit is None else min(n, limit)
        rows = part.rows[:n] if part.rows is not None else part.dataset.select(range(n))
        for i, row in enumerate(rows):
            if part.rows is not None and i in part.bad:
                reason, raw = part.bad[i]
                problems.append(Problem(part.locate(i), reason, raw))
                continue
            pair, reason = to_canonical_pair(row, columns)
            if reason is None:
                pairs.append(pair)
            else:
                problems.append(Problem(part.locate(i), reason, row))
        read += n
    if problems and not (skip_invalid and pairs):
        raise DataError(report(name, problems, read, len(pairs)))
    if not pairs:
        raise DataError(f"{name}: no rows - nothing to train on")
    ds = Dataset.from_list(pairs, features=canonical_features(FORMAT))
    return LoadedSplit(dataset=ds, format=FORMAT, name=name, rejected=problems if skip_invalid else [])


# ---- tokenization ---------------------------------------------------------------------------------


@dataclass
class PairStats:
    """What tokenization kept and dropped, for the run log, results.json and the report."""

    pairs: int = 0
    prompt_tokens: int = 0  # after truncation
    chosen_tokens: int = 0
    rejected_tokens: int = 0
    prompts_cut: int = 0
    prompt_tokens_dropped: int = 0
    replies_cut: int = 0  # chosen or rejected replies that lost their end (and so their end-of-turn token)
    reply_tokens_dropped: int = 0

    def add(self, other: PairStats) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def summary(self, name: str) -> str:
        text = f"{name}: {self.pairs} preference pairs"
        if self.prompts_cut:
            text += (f"; {self.prompts_cut} prompts cut from the left ({self.prompt_tokens_dropped} tokens) to fit "
                     "max length")
        if self.replies_cut:
            text += (f"; {self.replies_cut} replies too long even alone, cut at the end ({self.reply_tokens_dropped} "
                     "tokens; they lose their end-of-turn token)")
        return text


def reply_split(tokenizer, prompt: list[dict], reply: list[dict]) -> tuple[str, str]:
    """(prompt text with the generation prompt, reply text with its end-of-turn token), rendered by the
    tokenizer's chat template. The reply text is the template's loss span of the last reply, so it matches what
    supervised training trained on."""
    texts, spans = render_with_spans(tokenizer, [prompt + reply])
    start, end = spans[0][-1]
    head = render(tokenizer, [prompt], add_generation_prompt=True)[0]
    if texts[0][:start] != head:
        # a template that renders the history differently once a reply follows: the model sees `head` at inference
        raise DataError("the chat template renders the prompt differently with and without a reply, so preference "
                        "pairs cannot be split into prompt and reply tokens; pass --chat-template")
    return head, texts[0][start:end]


def truncate_pair(prompt_ids, chosen_ids, rejected_ids, max_length: int | None):
    """Fit prompt + each reply into max_length, keeping the replies: the shared prompt is cut from the left; a
    reply longer than max_length minus the prompt floor (an eighth of max_length, or the whole prompt if shorter:
    the question's end and the assistant header stay) is cut at its end."""
    stats = PairStats(pairs=1)
    if max_length is not None:
        floor = min(len(prompt_ids), max(1, max_length // 8))
        replies = []
        for ids in (chosen_ids, rejected_ids):
            budget = max_length - floor
            if len(ids) > budget:
                stats.replies_cut += 1
                stats.reply_tokens_dropped += len(ids) - budget
                ids = ids[:budget]
            replies.append(ids)
        chosen_ids, rejected_ids = replies
        keep = max_length - max(len(chosen_ids), len(rejected_ids))
        if keep < len(prompt_ids):
            stats.prompts_cut = 1
            stats.prompt_tokens_dropped = len(prompt_ids) - keep
            prompt_ids = prompt_ids[len(prompt_ids) - keep:]
    stats.prompt_tokens, stats.chosen_tokens = len(prompt_ids), len(chosen_ids)
    stats.rejected_tokens = len(rejected_ids)
    return prompt_ids, chosen_ids, rejected_ids, stats


def encode_pairs(tokenizer, pairs) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt ids, chosen ids, rejected ids) of each canonical pair, untruncated; one tokenizer call for all."""
    texts = []
    for pair in pairs:
        head, chosen = reply_split(tokenizer, pair["prompt"], pair["chosen"])
        _, rejected = reply_split(tokenizer, pair["prompt"], pair["rejected"])
        texts += [head, chosen, rejected]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    return [tuple(ids[k:k + 3]) for k in range(0, len(ids), 3)]


def tokenize_pairs(tokenizer, pairs, max_length: int | None = None) -> tuple[list[dict], PairStats]:
    """Token rows {prompt_ids, chosen_ids, rejected_ids, length} (TRL's column names; length for length-grouped
    batches) of canonical pairs (a list or a Dataset of them), truncated to max_length, with what was cut."""
    rows, total = [], PairStats()
    for start in range(0, len(pairs), 1000):
        chunk = pairs[start:start + 1000]
        if isinstance(chunk, dict):  # a Dataset slice: columns -> rows
            chunk = [dict(zip(chunk, v)) for v in zip(*chunk.values())]
        for ids in encode_pairs(tokenizer, chunk):
            p, c, r, stats = truncate_pair(*ids, max_length)
            rows.append({"prompt_ids": p, "chosen_ids": c, "rejected_ids": r, "length": len(p) + max(len(c), len(r))})
            total.add(stats)
    return rows, total


def tokenize_split(tokenizer, split: LoadedSplit, max_length: int | None):
    """A loaded preference split as a datasets.Dataset of token rows, and its PairStats."""
    from datasets import Dataset

    rows, stats = tokenize_pairs(tokenizer, split.dataset, max_length)
    return Dataset.from_list(rows), stats
