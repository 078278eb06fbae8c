"""`chattune eval`: assistant-token loss of the fine-tuned model and of its base on the same held-out
conversations, checked against a loss computed here with plain transformers."""

from __future__ import annotations

import json
import math
import shutil

import pyarrow.parquet as pq
import pytest
import torch
import yaml

from chattune.cli import main
from chattune.demo import assets


def independent_loss(model, tok, conversations, max_length):
    """Mean cross-entropy over assistant tokens with full logits, masks from transformers' own
    assistant-token mask: no chattune code involved."""
    total, count, correct = 0.0, 0, 0
    for conv in conversations:
        enc = tok.apply_chat_template(conv, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ids, mask = list(enc["input_ids"])[:max_length], list(enc["assistant_masks"])[:max_length]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].float()
        for t in range(1, len(ids)):
            if mask[t]:
                total += -torch.log_softmax(logits[t - 1], -1)[ids[t]].item()
                correct += int(logits[t - 1].argmax().item() == ids[t])
                count += 1
    return total / count, count, correct / count


@pytest.fixture(scope="module")
def held_out(ultrachat_dir):
    return [row["messages"] for row in pq.read_table(ultrachat_dir / "data" / "test_gen-00000-of-00001.parquet")
            .to_pylist()]


def test_fine_tuned_beats_base_and_matches_an_independent_loss(trained_dir, model_dir, held_out, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

    from chattune.data.template import prepare_tokenizer
    from chattune.model.load import fit_model_to_tokenizer

    # no --dataset: the run's own held-out split comes from its chattune.yaml
    assert main(["eval", str(trained_dir), "--baseline", str(model_dir), "--json", "--device", "cpu"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert {"loss", "perplexity", "accuracy", "tokens"} <= set(r)
    assert r["data"].endswith("[test_gen]") and r["conversations"] == len(held_out)
    b = r["baseline"]
    assert r["loss"] < b["loss"] and r["tokens"] == b["tokens"]
    assert r["difference"]["loss"] == pytest.approx(r["loss"] - b["loss"])
    assert r["perplexity"] == pytest.approx(math.exp(r["loss"]))

    max_length = yaml.safe_load((trained_dir / "chattune.yaml").read_text())["data"]["max_length"]
    tok = AutoTokenizer.from_pretrained(trained_dir)
    model = AutoModelForCausalLM.from_pretrained(trained_dir).eval()
    loss, count, acc = independent_loss(model, tok, held_out, max_length)
    assert count == r["tokens"]
    assert r["loss"] == pytest.approx(loss, rel=1e-4)
    assert r["accuracy"] == pytest.approx(acc, abs=1e-9)

    # the base model as training started from it: chattune's template and tokens, the run's seed
    base_tok = AutoTokenizer.from_pretrained(model_dir)
    setup = prepare_tokenizer(base_tok)
    set_seed(42)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    fit_model_to_tokenizer(base, base_tok, setup)
    base_loss, base_count, _ = independent_loss(base.eval(), base_tok, held_out, max_length)
    assert base_count == b["tokens"] and b["loss"] == pytest.approx(base_loss, rel=1e-4)


def test_table_with_samples_next_to_references(trained_dir, capsys):
    assert main(["eval", str(trained_dir), "--samples", "2", "--sample-tokens", "8", "--max-samples", "6",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if "perplexity" in line)
    assert header.split() == ["loss", "perplexity", "accuracy", "tokens"]
    assert "6 conversations" in out
    assert out.count("reference: ") == 2 and out.count("model: ") == 2


def test_baseline_with_another_tokenizer_is_refused(trained_dir, ultrachat_dir, tmp_path, capsys):
    other = {"train_gen": [{"messages": [{"role": "user", "content": "zebra quartz"},
                                         {"role": "assistant", "content": "xylophone jukebox"}]}] * 4}
    assets.build_base_model(tmp_path / "other", other, n_layer=1, n_embd=16, n_head=2, n_positions=128)
    code = main(["eval", str(trained_dir), "--dataset", str(ultrachat_dir), "--split", "test_gen", "--max-samples",
                 "4", "--baseline", str(tmp_path / "other"), "--device", "cpu"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1
    assert "different tokens" in errors[0] and "not comparable" in errors[0]


def test_other_data_set_without_split_names_the_splits(trained_dir, ultrachat_dir, tmp_path, capsys):
    other = shutil.copytree(ultrachat_dir, tmp_path / "other-data")
    assert main(["eval", str(trained_dir), "--dataset", str(other)]) == 2
    err = capsys.readouterr().err
    assert "give --split" in err and "test_gen" in err


def test_default_eval_data_of_a_mixed_run_is_the_rows_training_held_out(ultrachat_dir, tmp_path):
    import yaml

    from chattune.commands.eval import eval_data
    from chattune.config import Config, validate
    from chattune.data.mixture import load_training_data

    cfg = Config()
    cfg.model.name, cfg.train.output_dir = "gpt2", str(tmp_path)
    cfg.data.datasets = [{"dataset": str(ultrachat_dir), "split": "train_gen", "samples": 30},
                         {"dataset": str(ultrachat_dir), "split": "test_gen", "fraction": 0.5}]
    cfg.data.eval_fraction = 0.25
    validate(cfg).save(tmp_path)
    _, held = load_training_data(cfg)
    got = eval_data(tmp_path, None, None, None, None, None)
    assert len(held.dataset) > 0 and got.dataset["messages"] == held.dataset["messages"]
    assert len(eval_data(tmp_path, None, None, None, None, 2).dataset) == 2
    assert yaml.safe_load((tmp_path / "chattune.yaml").read_text())["data"]["datasets"]
