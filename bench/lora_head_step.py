"""One LoRA micro-batch (forward + backward) with chattune's selective head against full-vocabulary logits.

    python bench/lora_head_step.py      # needs the small-shape model and data train_speed.py builds

LoRA on GPT-2 trains the rows of the tokens chattune adds as PEFT trainable tokens, which wraps the
tied LM head; the selective head reads that wrapper's weight (chattune.model.loss.head_parts). Same
process, same 4 x 1024-token batch, alternating, 3 timings each; medians.
Result: bench/results/lora_head_step.json.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
WORK = Path.home() / ".cache" / "chattune" / "bench"


def main() -> dict:
    import datasets
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from chattune.data.collate import PadCollator
    from chattune.data.tokenize import encode_conversations
    from chattune.model.loss import full_logits_loss_sum, install_selective_head
    from chattune.model.speed import prepare_for_training, set_attention_dropout
    from recipes import chat_tokenizer

    base, chat = WORK / "model-small-50257-0", WORK / "model-small-50257-0-chat"
    data = WORK / "speed-data-640-32-0-50257"
    if not chat.is_dir() or not data.is_dir():
        sys.exit("run `python bench/train_speed.py` once first: it builds the model and data this uses")
    tok = chat_tokenizer(str(base))
    model = AutoModelForCausalLM.from_pretrained(str(chat))
    prepare_for_training(model, "cpu")
    set_attention_dropout(model, 0.0)
    added = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=["c_attn", "c_proj", "c_fc"],
                                             trainable_token_indices={"wte": added}))
    model.train()
    rows = encode_conversations(tok, datasets.load_dataset(str(data), split="train_gen")["messages"][:64], 1024)
    items = sorted(({"input_ids": i, "labels": lab} for i, lab in zip(rows["input_ids"], rows["labels"])),
                   key=lambda r: -len(r["input_ids"]))
    batch = PadCollator(tok.pad_token_id)(items[8:12])

    def full():
        start = time.perf_counter()
        loss, n, _ = full_logits_loss_sum(model, batch["input_ids"], None, batch["labels"])
        (loss / n).backward()
        model.zero_grad()
        return time.perf_counter() - start

    install_selective_head(model.get_base_model())

    def selective():
        start = time.perf_counter()
        out = model(input_ids=batch["input_ids"], selective_labels=batch["labels"])
        (out["loss_sum"] / out["n_tokens"]).backward()
        model.zero_grad()
        return time.perf_counter() - start

    full(), selective()  # warm-up
    times = {"full_logits_s": [], "selective_s": []}
    for _ in range(3):
        times["full_logits_s"].append(full())
        times["selective_s"].append(selective())
    result = {k: round(statistics.median(v), 2) for k, v in times.items()}
    result.update(runs={k: [round(x, 2) for x in v] for k, v in times.items()},
                  tokens=int((batch["attention_mask"]).sum()), loss_tokens=int((batch["labels"] != -100).sum()))
    (HERE / "results" / "lora_head_step.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
