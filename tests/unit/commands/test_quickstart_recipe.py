"""The quickstart's recipe: its assets follow --seed, role names are single tokens, one checkpoint per run."""

from __future__ import annotations

import math

import pytest

from chattune.commands import quickstart as qs
from chattune.demo import addition, assets


@pytest.fixture
def small_recipe(monkeypatch):
    monkeypatch.setattr(qs, "N_TRAIN", 200)
    monkeypatch.setattr(qs, "MODEL", {"n_layer": 1, "n_embd": 16, "n_head": 2})


def test_assets_follow_the_seed(tmp_path, small_recipe):
    import torch
    from safetensors.torch import load_file

    a = qs.build_assets(tmp_path / "a", n_eval=10, seed=1)
    b = qs.build_assets(tmp_path / "b", n_eval=10, seed=1)
    c = qs.build_assets(tmp_path / "c", n_eval=10, seed=2)
    assert a == b and a["train_gen"] != c["train_gen"]
    weights = {k: load_file(tmp_path / k / "base-model" / "model.safetensors") for k in "abc"}
    name = "transformer.h.0.attn.c_attn.weight"
    assert torch.equal(weights["a"][name], weights["b"][name])
    assert not torch.equal(weights["a"][name], weights["c"][name])
    # held-out rows use held-out operand pairs only, whatever the seed
    for row in c["test_gen"]:
        x, y = map(int, addition.NUMBER.findall(row["messages"][-1]["content"])[:2])
        assert addition.is_held_out(x, y)


def test_role_names_become_single_tokens():
    splits = addition.addition_splits(n_train=100, n_test=0, seed=0)
    tok = assets.train_tokenizer(list(assets.texts_of(splits, role_names_per_row=True)))
    for role in ("system", "user", "assistant"):
        assert tok.tokenize(role) == [role]


def test_config_evaluates_three_times_and_saves_once(tmp_path):
    cfg = qs.quickstart_config(tmp_path, max_steps=100, seed=7)
    t = cfg.train
    assert t.seed == 7 and t.max_steps == 100 and t.save_steps == 100 and t.save_total_limit == 1
    assert t.eval_steps == math.ceil(100 / 3)
    assert (t.batch_size, t.lr) == (qs.BATCH_SIZE, qs.LR)
    assert qs.quickstart_config(tmp_path).train.max_steps == qs.DEFAULT_STEPS


def test_threads_follow_idle_cores(monkeypatch):
    monkeypatch.setattr(qs.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(qs.os, "getloadavg", lambda: (0.9, 0.9, 0.9))  # this process alone
    assert qs.compute_threads(2) == 2
    monkeypatch.setattr(qs.os, "getloadavg", lambda: (4.0, 4.0, 4.0))
    assert qs.compute_threads(2) == 1
