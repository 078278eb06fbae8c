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
