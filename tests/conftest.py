"""Fixtures built in the test session: a tokenizer trained on a few lines, a 2-layer GPT-2 and a
data set laid out like HuggingFaceH4/ultrachat_200k. Nothing is fetched from the network."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from chattune import synth  # noqa: E402

LINES = [
    "hi there", "hello", "what is up", "the sky is blue", "you are kind",
    "what is 12 + 34", "12 + 34 = 46.", "be brief",
]
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def prepared_cache(tmp_path_factory) -> Path:
    """Prepared (tokenized) data is cached under the session's temporary directory, never the user's."""
    d = tmp_path_factory.mktemp("chattune-cache")
    old = os.environ.get("CHATTUNE_CACHE")
    os.environ["CHATTUNE_CACHE"] = str(d)
    yield d
    if old is None:
        os.environ.pop("CHATTUNE_CACHE", None)
    else:
        os.environ["CHATTUNE_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tok")
    synth.train_tokenizer(LINES * 4, d, vocab_size=300)
    return d


@pytest.fixture()
def tiny_tokenizer(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))


@pytest.fixture(scope="session")
def splits():
    return synth.addition_splits(n_train=64, n_test=16, seed=1)


@pytest.fixture(scope="session")
def ultrachat_dir(tmp_path_factory, splits) -> Path:
    """A local data set laid out like the ultrachat_200k hub repo (train_gen/test_gen splits)."""
    return synth.write_hub_layout(splits, tmp_path_factory.mktemp("ultrachat"))


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, splits) -> Path:
    """A GPT-2-like model directory: no pad token, no chat template, safetensors weights."""
    d = tmp_path_factory.mktemp("gpt2-tiny")
    synth.build_base_model(d, splits, n_layer=2, n_embd=32, n_head=2, n_positions=128)
    return d


@pytest.fixture(scope="session")
def trained_dir(tmp_path_factory, model_dir, ultrachat_dir) -> Path:
    """A chattune output directory: the tiny GPT-2 fine-tuned for a few dozen steps (report included)."""
    from chattune.config import Config, validate
    from chattune.train import run_train

    cfg = Config()
    cfg.model.name = str(model_dir)
    cfg.data.dataset, cfg.data.train_split, cfg.data.eval_split = str(ultrachat_dir), "train_gen", "test_gen"
    out = tmp_path_factory.mktemp("trained") / "out"
    t = cfg.train
    t.output_dir, t.max_steps, t.batch_size, t.lr, t.warmup = str(out), 60, 8, 3e-3, 0.1
    t.logging_steps, t.eval_steps, t.save_steps, t.group_by_length = 5, 30, 60, False
    run_train(validate(cfg))
    return out
