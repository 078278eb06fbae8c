"""How closely llama.cpp reproduces transformers on a model exported by `chattune export`, per dtype: greedy
replies equal token for token, the argmax agreement on the reply positions (teacher-forced on transformers'
reply), the largest logit difference, and the addition task's score from each side's replies.

    python bench/export_agreement.py --build tiny-out     # trains the tests' model (tests/conftest.py trained_dir)
    python bench/export_agreement.py tiny-out             # 200 held-out addition prompts
    python bench/export_agreement.py quickstart-out --prompts 50 --no-save   # any chattune output directory

Needs llama-cpp-python (pip install -e ".[export]"). Writes bench/results/export_agreement.json.
The prompts are held-out two-digit sums (chattune.demo.addition), formatted with the model's chat template.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent


def load_llama(path: Path, n_ctx: int):
    """llama.cpp with weight repacking off (its AMX q8_0 path crashes on some Sapphire Rapids CPUs,
    ggml-org/llama.cpp#20824) and an f32 KV cache, so f32 weights compute what transformers computes."""
    import llama_cpp

    defaults = llama_cpp.llama_cpp.llama_model_default_params

    def no_repack():
        params = defaults()
        params.use_extra_bufts = False
        return params

    llama_cpp.llama.llama_cpp.llama_model_default_params = no_repack
    try:
        return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=1, seed=0, verbose=False,
                               logits_all=True, type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    finally:
        llama_cpp.llama.llama_cpp.llama_model_default_params = defaults


def prompts(n: int, seed: int) -> list[tuple[list[dict], int | None]]:
    """(conversation up to the last user turn, the correct sum) for held-out addition rows."""
    from chattune.demo import addition

    rows = addition.addition_splits(n_train=0, n_test=n, seed=seed)["test_gen"]
    return [(r["messages"][:-1], addition.answer_of(r["messages"][-1]["content"])) for r in rows]


def hf_reply(model, ids: list[int], n: int, eos: int) -> tuple[list[int], np.ndarray]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=eos,
                             pad_token_id=eos)
        return out[0, len(ids):].tolist(), model(out).logits[0].numpy()


def llama_reply(llm, ids: list[int], n: int) -> list[int]:
    out = []
    for token in llm.generate(ids, top_k=1, temp=0.0, reset=True):
        out.append(token)
        if token == llm.token_eos() or len(out) == n:
            break
    return out


def measure(model, tok, llm, cases, max_new: int) -> dict:
    from chattune.demo.addition import answer_of

    eos = llm.token_eos()
    greedy_equal = same = total = hf_right = llama_right = 0
    worst = 0.0
    for messages, answer in cases:
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
        want, hf_logits = hf_reply(model, ids, max_new, eos)
        got = llama_reply(llm, ids, max_new)
        greedy_equal += got == want
        llm.reset()
        llm.eval(ids + want)
        ours = np.array(llm.scores[: len(ids) + len(want)])
        reply = slice(len(ids) - 1, -1)
        same += int((ours[reply].argmax(-1) == hf_logits[reply].argmax(-1)).sum())
        total += len(want)
        worst = max(worst, float(np.abs(ours - hf_logits).max()))
        hf_right += answer_of(tok.decode(want, skip_special_tokens=True)) == answer
        llama_right += answer_of(tok.decode(got, skip_special_tokens=True)) == answer
    return {"prompts": len(cases), "greedy_replies_equal": greedy_equal, "argmax_agree": same,
            "reply_positions": total, "max_abs_logit_diff": worst, "task_correct_transformers": hf_right,
            "task_correct_llama_cpp": llama_right}


def build(directory: Path) -> Path:
    """The model the export tests check: tests/conftest.py's trained_dir recipe (a 2-layer GPT-2, 60 steps)."""
    from chattune.commands.train import run_train
    from chattune.config import Config, validate
    from chattune.demo import addition, assets

    splits = addition.addition_splits(n_train=64, n_test=16, seed=1)
    data = assets.write_hub_layout(splits, directory / "data")
    base = assets.build_base_model(directory / "base", splits, n_layer=2, n_embd=32, n_head=2, n_positions=128)
    cfg = Config()
    cfg.model.name, cfg.data.dataset = str(base), str(data)
    cfg.data.train_split, cfg.data.eval_split = "train_gen", "test_gen"
    t = cfg.train
    t.output_dir, t.max_steps, t.batch_size, t.lr, t.warmup = str(directory / "out"), 60, 8, 3e-3, 0.1
    t.logging_steps, t.eval_steps, t.save_steps, t.group_by_length = 5, 30, 60, False
    run_train(validate(cfg))
    return directory / "out"


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chattune.commands.export import run_export

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", help="a chattune output directory (a GPT-2 trained on the addition task)")
    p.add_argument("--build", metavar="DIR", help="first train the tests' model into DIR/out and measure that")
    p.add_argument("--prompts", type=int, default=200)
    p.add_argument("--seed", type=int, default=7, help="seed of the held-out prompts")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--no-save", action="store_true", help="print only; do not write bench/results")
    args = p.parse_args()
    # one thread each: threads that spin while waiting (torch's and ggml's) crawl on a shared, busy machine
    torch.set_num_threads(1)
    if args.build:
        args.model = str(build(Path(args.build)))
    if not args.model:
        p.error("give a MODEL directory or --build DIR")
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    tok = AutoTokenizer.from_pretrained(args.model)
    cases = prompts(args.prompts, args.seed)
    result = {"model": Path(args.model).name, "max_new_tokens": args.max_new_tokens,
              "machine": platform.processor() or platform.machine(), "dtypes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("f32", "f16", "q8_0"):
            written = run_export(args.model, tmp, dtype=dtype, name="bench")
            start = time.perf_counter()
            llm = load_llama(Path(written["gguf"]), n_ctx=min(written["context"], 512))
            row = {"file_bytes": written["bytes"], **measure(model, tok, llm, cases, args.max_new_tokens),
                   "seconds": round(time.perf_counter() - start, 1)}
            result["dtypes"][dtype] = row
            print(dtype, json.dumps(row))
    if not args.no_save:
        out = HERE / "results" / "export_agreement.json"
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
