"""One training recipe in this process, measured by measure.Meter; train_speed.py runs each in its own.

    python bench/recipes.py {tutorial|trl|chattune} SPEC.json RESULT.json

- tutorial: the tutorial's script (transformers Trainer, DataCollatorForLanguageModeling(mlm=False),
  pad = eos, `role: content` lines over messages[:-1], batch 4 x accumulation 4, lr 2e-5, cosine,
  warm-up 0.05), with only the changes it needs to run here: max length from the spec instead of 128,
  fp16 off (no CUDA), warmup_ratio -> warmup_steps=0.05 (transformers 5), report_to="none",
  load_best_model_at_end off (it cannot run with save_strategy="no"), and a max_steps bound.
- trl: SFTConfig() defaults (batch 8, gradient checkpointing on, linear schedule, loss on every token)
  with bf16=False (it fails on a CPU), the spec's max length, accumulation 2 so a step holds the same
  16 conversations, and gpt2's missing chat template supplied: the tokenizer and resized model
  chattune prepares (its ChatML template), so TRL and chattune train on identical tokens.
- chattune: `chattune.commands.train.run_train` with its defaults, given the data, max length, batch 4 x
  accumulation 4 and the max_steps bound; chattune-attn-dropout: the same with gpt2's own attention
  dropout (0.1) instead of chattune's default 0.

Every recipe then scores held-out conversations in the format it trained on (see heldout_rows).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import measure  # noqa: E402

ROLE_SEP = ": "


def tutorial_text(messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The tutorial's `role: content` lines, and the character spans of assistant content."""
    parts, spans, at = [], [], 0
    for i, m in enumerate(messages):
        head = ("\n" if i else "") + m["role"] + ROLE_SEP
        if m["role"] == "assistant":
            spans.append((at + len(head), at + len(head) + len(m["content"])))
        parts.append(head + m["content"])
        at += len(head) + len(m["content"])
    return "".join(parts), spans


def tutorial_rows(tokenizer, conversations, max_length: int) -> dict:
    """Token ids and assistant-content labels of conversations in the tutorial's format (all turns)."""
    from chattune.data.tokenize import Encoder

    texts, spans = zip(*(tutorial_text(c) for c in conversations))
    out = Encoder(tokenizer, max_length).encode(list(texts), list(spans))
    ids, labels, lengths = out["ids"].tolist(), out["labels"].tolist(), out["lengths"].tolist()
    rows, at = {"input_ids": [], "labels": []}, 0
    for n in lengths:
        rows["input_ids"].append(ids[at:at + n])
        rows["labels"].append(labels[at:at + n])
        at += n
    return rows


def table_of(rows: dict) -> dict:
    return {measure.row_key(ids): (len(ids), sum(1 for t in lab if t != -100))
            for ids, lab in zip(rows["input_ids"], rows["labels"])}


def load_conversations(data_dir: str, split: str) -> list[list[dict]]:
    import datasets

    return datasets.load_dataset(data_dir, split=split)["messages"]


def chat_tokenizer(base_dir: str):
    from transformers import AutoTokenizer

    from chattune.data.template import prepare_tokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    prepare_tokenizer(tok)
    return tok


def heldout_loss(model, rows: dict, pad_id: int, batch_size: int = 4) -> dict:
    """Mean cross-entropy over held-out assistant tokens (chattune.training.metrics, the same code for all)."""
    from chattune.data.collate import PadCollator
    from chattune.training.metrics import evaluate_batches, summarize

    collate = PadCollator(pad_id)
    items = [{"input_ids": i, "labels": lab} for i, lab in zip(rows["input_ids"], rows["labels"])]
    batches = [collate(items[s:s + batch_size]) for s in range(0, len(items), batch_size)]
    return summarize(*evaluate_batches(model, batches).tolist())


# --- recipes: each returns (heldout rows, pad id) after arranging its training --------------------

def run_tutorial(spec: dict, meter: measure.Meter):
    from datasets import load_dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainingArguments,
    )

    model = AutoModelForCausalLM.from_pretrained(spec["base_dir"])
    train_dataset = load_dataset(spec["data_dir"], split="train_gen")

    def prepare_datasets(data):  # the tutorial's function: every message but the last
        prompt = ""
        for i in range(len(data["messages"]) - 1):
            line = f"""{data['messages'][i]['role']}: {data['messages'][i]['content']}"""
            prompt = prompt + "\n" + line if len(prompt) > 0 else line
        data["query"] = prompt
        return data

    def tokenize_datasets(dataset):
        return dataset.map(lambda example: tokenizer(example["query"], truncation=True, max_length=spec["max_length"]),
                           batched=True, remove_columns=["query"])

    train_dataset = train_dataset.map(prepare_datasets, remove_columns=["prompt", "prompt_id", "messages"])
    tokenizer = AutoTokenizer.from_pretrained(spec["base_dir"])
    tokenizer.pad_token = tokenizer.eos_token
    train_dataset = tokenize_datasets(train_dataset)
    data_collator = DataCollatorForLanguageModeling(tokenizer=tokenizer, mlm=False)
    batch_size = 4
    training_args = TrainingArguments(
        output_dir=spec["work_dir"], gradient_accumulation_steps=batch_size, num_train_epochs=3,
        per_device_train_batch_size=batch_size, per_device_eval_batch_size=batch_size,
        load_best_model_at_end=False, save_strategy="no", save_total_limit=2, fp16=torch.cuda.is_available(),
        learning_rate=2e-05, lr_scheduler_type="cosine", warmup_steps=0.05, report_to="none",
        max_steps=spec["max_steps"], seed=spec["seed"],
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=train_dataset, data_collator=data_collator)
    # the training rows, with their assistant-content tokens (messages[:-1]: the final reply is not there)
    conversations = load_conversations(spec["data_dir"], "train_gen")
    meter.table.update(table_of(tutorial_rows(tokenizer, [c[:-1] for c in conversations], spec["max_length"])))
    heldout = tutorial_rows(tokenizer, load_conversations(spec["data_dir"], "test_gen"), spec["max_length"])
    return trainer.train, (lambda: trainer.model), heldout, tokenizer.pad_token_id


def run_trl(spec: dict, meter: measure.Meter):
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from chattune.data.tokenize import encode_conversations

    tokenizer = chat_tokenizer(spec["base_dir"])
    model = AutoModelForCausalLM.from_pretrained(spec["chat_model_dir"])
    dataset = load_dataset(spec["data_dir"], split="train_gen").select_columns(["messages"])
    args = SFTConfig(output_dir=spec["work_dir"], bf16=False, max_length=spec["max_length"],
                     gradient_accumulation_steps=16 // SFTConfig.per_device_train_batch_size,
                     max_steps=spec["max_steps"], report_to="none", seed=spec["seed"], save_strategy="no")
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    conversations = load_conversations(spec["data_dir"], "train_gen")
    meter.table.update(table_of(encode_conversations(tokenizer, conversations, spec["max_length"])))
    heldout = encode_conversations(tokenizer, load_conversations(spec["data_dir"], "test_gen"), spec["max_length"])
    return trainer.train, (lambda: trainer.model), heldout, tokenizer.pad_token_id


def run_trl_gpu(spec: dict, meter: measure.Meter):
    """TRL's SFTTrainer with its documented GPU speed settings (TRL docs, "Reducing memory usage" and "Speeding up
    training"): bf16; padding-free batches with FlashAttention when flash-attn imports (else no padding-free:
    without a varlen kernel it would let packed rows attend across each other); Liger kernels when liger-kernel
    imports; no gradient checkpointing (the 124M model fits: it only costs time); one micro-batch of 16."""
    import importlib.util

    from datasets import load_dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from chattune.data.tokenize import encode_conversations

    flash = importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()
    try:  # installed and importable with this torch and transformers (its wheel is in gpu_check.sh's list)
        import liger_kernel.transformers  # noqa: F401

        liger = torch.cuda.is_available() and spec.get("liger", True)
    except Exception:
        liger = False
    tokenizer = chat_tokenizer(spec["base_dir"])
    load = {"dtype": torch.bfloat16, "attn_implementation": "flash_attention_2"} if flash else {}
    model = AutoModelForCausalLM.from_pretrained(spec["chat_model_dir"], **load)
    dataset = load_dataset(spec["data_dir"], split="train_gen").select_columns(["messages"])
    cuda = torch.cuda.is_available()
    args = SFTConfig(output_dir=spec["work_dir"], bf16=cuda, max_length=spec["max_length"],
                     per_device_train_batch_size=16, gradient_accumulation_steps=1, gradient_checkpointing=False,
                     padding_free=flash, use_liger_kernel=liger, max_steps=spec["max_steps"], report_to="none",
                     seed=spec["seed"], save_strategy="no", dataloader_num_workers=2 if cuda else 0)
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    meter.notes = {"flash_attn": flash, "liger_kernel": liger, "padding_free": flash}
    conversations = load_conversations(spec["data_dir"], "train_gen")
    meter.table.update(table_of(encode_conversations(tokenizer, conversations, spec["max_length"])))
    heldout = encode_conversations(tokenizer, load_conversations(spec["data_dir"], "test_gen"), spec["max_length"])
    return trainer.train, (lambda: trainer.model), heldout, tokenizer.pad_token_id


def run_chattune(spec: dict, meter: measure.Meter, attention_dropout: float | None = 0.0):
    from chattune.commands.train import run_train
    from chattune.config import Config, validate
    from chattune.data.tokenize import encode_conversations

    cfg = Config()
    cfg.model.name = spec["base_dir"]
    cfg.data.dataset, cfg.data.train_split, cfg.data.max_length = spec["data_dir"], "train_gen", spec["max_length"]
    t = cfg.train
    # a directory of its own: `chattune train` refuses a non-empty one that is not a run (work_dir holds spec.json)
    t.output_dir, t.batch_size, t.grad_accum = str(Path(spec["work_dir"]) / "out"), 4, 4
    t.max_steps, t.seed, t.attention_dropout = spec["max_steps"], spec["seed"], attention_dropout
    # the GPU check: chattune's defaults there (--batch-size auto keeps 4 x 4 = 16 conversations a step), a
    # forced precision, torch.compile; a few losses logged for the fp16 / bf16 comparison
    t.batch_size = spec.get("chattune_batch_size", t.batch_size)
    t.precision, t.compile = spec.get("precision", t.precision), spec.get("compile", False)
    t.logging_steps = spec.get("logging_steps", t.logging_steps)
    validate(cfg)
    tokenizer = chat_tokenizer(spec["base_dir"])
    conversations = load_conversations(spec["data_dir"], "train_gen")
    meter.table.update(table_of(encode_conversations(tokenizer, conversations, spec["max_length"])))
    heldout = encode_conversations(tokenizer, load_conversations(spec["data_dir"], "test_gen"), spec["max_length"])
    return (lambda: run_train(cfg)), (lambda: meter.model), heldout, tokenizer.pad_token_id


RECIPES = {"tutorial": run_tutorial, "trl": run_trl, "trl-gpu": run_trl_gpu, "chattune": run_chattune,
           # chattune with the model's own attention dropout (gpt2: 0.1), which sends SDPA to its unfused path
           "chattune-attn-dropout": lambda spec, meter: run_chattune(spec, meter, attention_dropout=None)}


def main(recipe: str, spec_file: str, result_file: str) -> None:
    spec = json.loads(Path(spec_file).read_text())
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("CHATTUNE_CACHE", str(Path(spec["work_dir"]) / "cache"))
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    meter = measure.Meter({}, spec["budget_s"], spec["warmup"], spec["min_measured"])
    measure.install(meter)
    train, get_model, heldout, pad_id = RECIPES[recipe](spec, meter)
    ceiling = measure.matmul_ceiling()  # in this process, just before training: the load the run will see
    try:
        train()
    except measure.BudgetSpent:
        pass
    result = {"recipe": recipe, **meter.finish(), "matmul_gflops": ceiling, **getattr(meter, "notes", {})}
    if torch.cuda.is_available():
        result["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        result["gpu"] = torch.cuda.get_device_name(0)
    metrics = Path(spec["work_dir"]) / "out" / "metrics.jsonl"  # chattune's log: the loss curve (fp16 vs bf16)
    if metrics.is_file():
        records = [json.loads(line) for line in metrics.read_text().splitlines()]
        result["train_losses"] = [[r["step"], r["loss"]] for r in records if "loss" in r]
        result["train_log"] = [r for r in records if "train_runtime" not in r]
    # chattune's resolved config: the layout --batch-size auto chose
    saved = Path(spec["work_dir"]) / "out" / "chattune.yaml"
    if saved.is_file():
        import yaml

        train = yaml.safe_load(saved.read_text())["train"]
        result["layout"] = f"{train['batch_size']}x{train['grad_accum']}"
        result["log_lines"] = [f"layout {result['layout']}, precision {train['precision']}"]
    model = get_model()
    result["heldout"] = heldout_loss(model, heldout, pad_id)
    Path(result_file).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main(*sys.argv[1:4])
