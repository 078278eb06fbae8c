"""A generated stand-in for HuggingFaceH4/ultrachat_200k at full size, and a GPT-2-sized tokenizer.

The hub is out of reach offline, so the benchmark builds its own: conversations of 2-8 messages
whose token lengths follow ultrachat's (median ~922, p95 ~2534 GPT-2 tokens: a log-normal), made of
sentences over a Zipf-distributed vocabulary of invented words, written in the hub layout
(data/train_gen-*.parquet + README with `configs:`), and a byte-level BPE tokenizer of GPT-2's
size (50257 tokens, GPT-2's pre-tokenizer) trained on a sample of that text.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from chattune.demo import assets

MEDIAN_TOKENS, P95_TOKENS = 922, 2534
SIGMA = float(np.log(P95_TOKENS / MEDIAN_TOKENS) / 1.645)
PAIRS, PAIR_P = (1, 2, 3, 4), (0.3, 0.3, 0.2, 0.2)  # user/assistant pairs: 2-8 messages
GPT2_VOCAB = 50257


def _vocabulary(rng: np.random.Generator, n_words: int = 120_000) -> tuple[list[str], np.ndarray]:
    onsets = ["", "b", "c", "d", "f", "g", "h", "l", "m", "n", "p", "r", "s", "t", "v", "w", "br", "ch", "cl", "cr",
              "dr", "fl", "gr", "pl", "pr", "sh", "sl", "st", "th", "tr", "wh"]
    vowels = ["a", "e", "i", "o", "u", "ai", "ea", "ee", "ie", "oo", "ou"]
    codas = ["", "", "", "n", "r", "s", "t", "l", "nd", "ng", "st", "ck", "m"]
    syllables = [o + v + c for o in onsets for v in vowels for c in codas]
    words, seen = [], set()
    while len(words) < n_words:
        ks = 1 + np.minimum(rng.exponential(1.0, size=n_words).astype(int), 4)
        picks = rng.integers(len(syllables), size=int(ks.sum()))
        at = 0
        for k in ks:  # frequent words come first and are short, as in a real vocabulary
            w = "".join(syllables[j] for j in picks[at:at + k])
            at += k
            if w not in seen:
                seen.add(w)
                words.append(w)
    words = words[:n_words]
    rank = np.arange(1, n_words + 1, dtype=np.float64)
    p = 1.0 / (rank + 2.7) ** 1.07
    return words, np.cumsum(p / p.sum())


def _sentences(rng: np.random.Generator, n: int) -> list[str]:
    words, cdf = _vocabulary(rng)
    lengths = rng.integers(4, 28, size=n)
    picks = np.searchsorted(cdf, rng.random(int(lengths.sum())))
    ends = [".", ".", ".", "?", "!", ":", ";"]
    out, at = [], 0
    for i, k in enumerate(lengths):
        ws = [words[j] for j in picks[at:at + k]]
        at += k
        if i % 7 == 0:
            ws.insert(int(rng.integers(len(ws))), str(int(rng.integers(1, 2025))))
        if i % 5 == 0:
            ws[min(2, len(ws) - 1)] += ","
        out.append(ws[0].capitalize() + " " + " ".join(ws[1:]) + ends[i % len(ends)])
    return out


class Generator:
    """Deterministic conversations; `tokens_per_sentence` is calibrated against the tokenizer."""

    def __init__(self, seed: int = 0, n_sentences: int = 200_000, tokens_per_sentence: float = 20.0):
        self.rng = np.random.default_rng(seed)
        self.sentences = _sentences(self.rng, n_sentences)
        self.tokens_per_sentence = tokens_per_sentence

    def rows(self, n: int, chunk: int = 10_000):
        """Conversations in the ultrachat schema; random draws are made a chunk at a time (speed)."""
        rng, sentences = self.rng, self.sentences
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            totals = MEDIAN_TOKENS * np.exp(rng.normal(0.0, SIGMA, size=m)) / self.tokens_per_sentence
            pairs = rng.choice(PAIRS, p=PAIR_P, size=m)
            shares = [rng.dirichlet(np.ones(k)) for k in pairs]
            picks = iter(rng.integers(len(sentences), size=int(totals.sum() * 1.2) + 8 * m).tolist())
            paragraph = iter(rng.integers(3, 6, size=int(totals.sum()) + 8 * m).tolist())
            for total, share in zip(totals, shares):
                msgs = []
                for s in share:
                    budget = total * s
                    user = max(1, round(budget * 0.12))
                    assistant = max(1, round(budget - user))
                    msgs.append({"role": "user", "content": " ".join(sentences[next(picks)] for _ in range(user))})
                    parts = [sentences[next(picks)] for _ in range(assistant)]
                    paras, at = [], 0
                    while at < len(parts):
                        step = next(paragraph)
                        paras.append(" ".join(parts[at:at + step]))
                        at += step
                    msgs.append({"role": "assistant", "content": "\n\n".join(paras)})
                yield {"prompt": msgs[0]["content"], "messages": msgs,
                       "prompt_id": hashlib.sha256(msgs[0]["content"].encode()).hexdigest()}


def train_gpt2_like_tokenizer(texts: list[str], directory: Path, vocab_size: int = GPT2_VOCAB):
    """Byte-level BPE with GPT-2's pre-tokenizer and its one special token, saved like the gpt2 repo."""
    return assets.train_tokenizer(texts, directory, vocab_size, split_digits=False)


def write_split(rows, directory: Path, split: str = "train_gen", chunk: int = 20_000) -> Path:
    """Rows to data/{split}-00000-of-00001.parquet in the hub layout, streamed in chunks."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (directory / "data").mkdir(parents=True, exist_ok=True)
    name = f"data/{split}-00000-of-00001.parquet"
    writer, batch = None, []

    def flush():
        nonlocal writer
        table = pa.Table.from_pylist(batch)
        writer = writer or pq.ParquetWriter(directory / name, table.schema)
        writer.write_table(table)
        batch.clear()

    for row in rows:
        batch.append(row)
        if len(batch) == chunk:
            flush()
    if batch:
        flush()
    writer.close()
    (directory / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  data_files:\n"
        f"  - split: {split}\n    path: {name}\n---\n\n# Generated ultrachat-like conversations\n")
    return directory


def build(directory: Path, n: int, seed: int = 0, vocab_size: int = GPT2_VOCAB, log=print) -> dict:
    """Tokenizer in directory/tokenizer, data set in directory/data-N; reused when already built."""
    directory.mkdir(parents=True, exist_ok=True)
    tok_dir, data_dir = directory / f"tokenizer-{vocab_size}", directory / f"data-{n}-{seed}-{vocab_size}"
    meta_file = data_dir / "lengths.json"
    if meta_file.is_file() and (tok_dir / "tokenizer.json").is_file():
        return json.loads(meta_file.read_text())
    from transformers import AutoTokenizer

    gen = Generator(seed)
    if not (tok_dir / "tokenizer.json").is_file():
        log(f"training a byte-level BPE tokenizer with {vocab_size} tokens")
        sample = [m["content"] for row in Generator(seed + 1).rows(4000) for m in row["messages"]]
        train_gpt2_like_tokenizer(sample, tok_dir, vocab_size)
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    probe = gen.sentences[:20000]
    gen.tokens_per_sentence = sum(len(x) for x in tok(probe)["input_ids"]) / len(probe)
    log(f"generating {n} conversations in {data_dir}")
    write_split(gen.rows(n), data_dir)
    import pyarrow.parquet as pq

    first = pq.ParquetFile(next((data_dir / "data").glob("*.parquet"))).read_row_group(0).slice(0, 2000)
    lengths = [sum(len(ids) for ids in tok([m["content"] for m in msgs])["input_ids"])
               for msgs in first.column("messages").to_pylist()]
    meta = {"n": n, "median_tokens": float(np.median(lengths)), "p95_tokens": float(np.percentile(lengths, 95)),
            "tokens_per_sentence": gen.tokens_per_sentence, "tokenizer": str(tok_dir), "data": str(data_dir)}
    meta_file.write_text(json.dumps(meta, indent=2))
    return meta
