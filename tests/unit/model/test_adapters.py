"""LoRA on a tiny GPT-2: the adapter run trains its added tokens, its output directory chats and
evaluates like a full model, and the merged model gives the adapter model's logits."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from chattune.cli import main
from chattune.commands.train import run_train
from chattune.config import Config, LoraConfig
from chattune.data.template import prepare_tokenizer
from chattune.errors import ChattuneError
from chattune.model import adapters
from chattune.model.hub import load_tokenizer
from chattune.model.load import fit_model_to_tokenizer, load_model
from chattune.outputs import MERGED_DIR

CONV = [{"role": "user", "content": "What is 12 + 34?"}, {"role": "assistant", "content": "12 + 34 = 46."}]
DELTA = "trainable_tokens_delta"


@pytest.fixture(scope="module")
def lora_run(model_dir, ultrachat_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "out"
    cfg = Config()
    cfg.model.name = str(model_dir)
    cfg.data.dataset, cfg.data.train_split, cfg.data.eval_split = str(ultrachat_dir), "train_gen", "test_gen"
    t = cfg.train
    t.output_dir, t.batch_size, t.max_steps, t.save_steps, t.logging_steps, t.lr = str(out), 8, 8, 4, 1, 5e-3
    t.gradient_checkpointing, t.eval_baseline = True, False
    cfg.lora.enabled, cfg.lora.r, cfg.lora.merge = True, 8, True
    result = run_train(cfg)
    return out, result


def token_delta(path):
    with safe_open(str(path / "adapter_model.safetensors"), "pt") as f:
        key = next(k for k in f.keys() if DELTA in k)
        return f.get_tensor(key)


def test_adapter_output_is_small_and_trains_the_added_tokens(lora_run):
    out, _ = lora_run
    assert (out / "adapter_config.json").is_file() and not (out / "model.safetensors").exists()
    config = json.loads((out / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["c_attn", "c_fc", "c_proj"] and config["fan_in_fan_out"]
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any("lora_A" in k for k in keys)
    assert not any(k.endswith("wte.weight") for k in keys)  # the token rows, not the whole embedding matrix

    tok = load_tokenizer(str(out))
    eot, start = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|im_start|>")
    indices = config["trainable_token_indices"]["transformer.wte"]
    assert eot in indices and start in indices
    row = indices.index(eot)
    early, final = token_delta(out / "checkpoint-4")[row], token_delta(out)[row]
    assert not torch.equal(early, final), "the end-of-turn embedding did not change between checkpoints"

    merged = load_model(str(out / MERGED_DIR))
    torch.testing.assert_close(merged.transformer.wte.weight[eot], final, rtol=0, atol=0)
    assert merged.lm_head.weight.data_ptr() == merged.transformer.wte.weight.data_ptr()  # still tied


def test_training_lowered_the_loss(lora_run):
    out, _ = lora_run
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert losses[-1] < losses[0]


def test_merged_model_gives_the_adapter_models_logits(lora_run):
    out, _ = lora_run
    adapter_model = load_model(str(out), merge_adapter=False).eval()
    assert type(adapter_model).__name__.startswith("PeftModel")
    merged = load_model(str(out / MERGED_DIR)).eval()
    tok = load_tokenizer(str(out))
    enc = tok.apply_chat_template([CONV], tokenize=True, return_dict=True, return_tensors="pt")
    with torch.no_grad():
        a, m = adapter_model(**enc).logits, merged(**enc).logits
    assert (a - m).abs().max().item() < 1e-5


def test_adapter_directory_chats_and_evaluates(lora_run):
    from chattune.commands.eval import run_eval
    from chattune.model.load import load_chat_model

    out, result = lora_run
    model, tok = load_chat_model(str(out), "cpu")
    merged, _ = load_chat_model(str(out / MERGED_DIR), "cpu")
    assert model.generation_config.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    enc = tok.apply_chat_template([CONV[:1]], add_generation_prompt=True, return_dict=True, return_tensors="pt")
    kw = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False, "pad_token_id": tok.pad_token_id}
    reply = model.generate(**enc, **kw)[0, enc["input_ids"].shape[1]:]
    assert len(reply) == 6
    assert torch.equal(reply, merged.generate(**enc, **kw)[0, enc["input_ids"].shape[1]:])

    scored = run_eval(str(out), device="cpu")
    assert scored["tokens"] == result["eval"]["eval_tokens"]
    assert scored["loss"] == pytest.approx(result["eval"]["eval_loss"], rel=1e-5)


def test_default_targets_and_untied_heads_keep_new_token_rows(tiny_tokenizer, tmp_path, monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    rows = len(tiny_tokenizer)
    setup = prepare_tokenizer(tiny_tokenizer)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=rows, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False))
    fit_model_to_tokenizer(llama, tiny_tokenizer, setup)
    ids = adapters.new_token_ids(tiny_tokenizer, setup.added_tokens, rows)
    assert ids == list(range(rows, len(tiny_tokenizer)))
    config = adapters.lora_config(llama, LoraConfig(), ids, "tiny-llama", None)
    assert config.target_modules == "all-linear" and not config.fan_in_fan_out
    # an untied head needs its own rows for the new tokens, or it could never emit them
    assert config.trainable_token_indices == {"model.embed_tokens": ids, "lm_head": ids}

    monkeypatch.chdir(tmp_path)
    (tmp_path / "base").mkdir()  # a local base given as a relative path is recorded absolute
    assert adapters.lora_config(llama, LoraConfig(), ids, "base", None).base_model_name_or_path == \
        str(tmp_path.resolve() / "base")
    with pytest.raises(ChattuneError, match="q_projection not found .* its linear layers are: .*q_proj"):
        adapters.lora_config(llama, LoraConfig(target_modules=["q_projection"]), ids, "tiny-llama", None)

    peft_model = adapters.wrap(llama, LoraConfig(), ids, "tiny-llama", None, args=None)
    assert peft_model.peft_config["default"].base_model_name_or_path == "tiny-llama"
    x = torch.tensor([[ids[0], 5, ids[-1]]])
    peft_model(input_ids=x, labels=x).loss.backward()
    grads = {n: p.grad for n, p in peft_model.named_parameters() if DELTA in n}
    assert len(grads) == 2 and all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_qlora_without_cuda_fails_before_reading_anything(capsys, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    code = main(["train", "--qlora", "--model", "gpt2", "--dataset", str(tmp_path / "missing"),
                 "--output-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: --qlora needs a CUDA GPU")
    assert not (tmp_path / "o").exists()


def test_merge_command_refuses_what_it_cannot_merge(capsys, lora_run, model_dir, tmp_path):
    out, _ = lora_run
    assert main(["merge", str(model_dir), "--output-dir", str(tmp_path / "m")]) == 2
    assert "is not an adapter directory" in capsys.readouterr().err
    assert main(["merge", str(out), "--output-dir", str(out)]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert main(["merge", str(out), "--output-dir", str(tmp_path / "m")]) == 0
    assert main(["train", "--merge", "--model", str(model_dir), "--output-dir", str(tmp_path / "t")]) == 2
    assert "needs an adapter run: add --lora" in capsys.readouterr().err
    assert (tmp_path / "m" / "model.safetensors").is_file() and (tmp_path / "m" / "tokenizer.json").is_file()
