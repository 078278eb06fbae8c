"""GPU check: the tutorial's recipe, TRL's SFTTrainer with its documented GPU settings, and chattune, side by side
on one CUDA GPU, GPT-2 124M shape, ultrachat-like conversations; real tokens/s, MFU, peak memory, held-out loss
after the same wall-clock time. Also the tutorial's own max length (128) and chattune's fp16 path.

    bash bench/gpu_check.sh                 # on the GPU machine (installs the wheels in .whl first)
    python bench/gpu_check.py --smoke       # anywhere, tiny settings: checks the script itself (CPU: ~3 min)

It generates ultrachat-like conversations (ultrachat_like.py; train_gen / test_gen splits) and a byte-level BPE
tokenizer with GPT-2's vocabulary size, builds a randomly initialised GPT-2 124M locally (no hub needed), and
runs each recipe (recipes.py) in its own process for the same wall-clock budget with the same seed; measure.Meter
times the micro-batches after a warm-up, with the GPU synchronised at the window's ends. MFU is against the card's
dense bf16 peak (looked up from its name; --peak-tflops overrides), counting the LM head only where a recipe puts
a loss (every position for the tutorial and TRL, assistant tokens for chattune).

Runs (default plan, about 7 minutes on an H200 including set-up, by the set-up and start-up times seen there):
  len1024: tutorial, trl-gpu, chattune (defaults: --batch-size auto), chattune --compile (fixed shapes)
  len128 (the tutorial's setting): tutorial, trl-gpu, chattune
  fp16: chattune --precision fp16 at 1024, its loss curve against the bf16 run's (same seed, same batches)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# dense bf16 tensor-core peaks, TFLOP/s (vendor data sheets); the first name found in the card's name wins
BF16_PEAKS = (("H200", 989.0), ("GH200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0),
              ("L40S", 362.0), ("A10G", 125.0), ("L4", 121.0), ("RTX 4090", 165.0), ("T4", 65.0))


def bf16_peak(name: str) -> float | None:
    for key, peak in BF16_PEAKS:
        if key in name:
            return peak
    return None


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build(work: Path, n_rows: int, n_heldout: int, vocab: int, shape: dict, seed: int = 0) -> dict:
    """Data in the ultrachat_200k layout, a gpt2-like model directory (no chat template, no pad) and the same model
    fitted to chattune's chat template (TRL needs a template gpt2 lacks)."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    import ultrachat_like
    from chattune.data.template import prepare_tokenizer
    from chattune.demo.assets import write_hub_layout
    from chattune.model.load import fit_model_to_tokenizer

    gen = ultrachat_like.Generator(seed, n_sentences=20_000)
    tok_dir = work / "tokenizer"
    sample = [m["content"] for row in gen.rows(min(1500, n_rows)) for m in row["messages"]]
    ultrachat_like.train_gpt2_like_tokenizer(sample, tok_dir, vocab)
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    probe = gen.sentences[:5000]
    gen.tokens_per_sentence = sum(len(x) for x in tok(probe)["input_ids"]) / len(probe)
    rows = list(gen.rows(n_rows + n_heldout))
    data = write_hub_layout({"train_gen": rows[:n_rows], "test_gen": rows[n_rows:]}, work / "data")
    # the model keeps GPT-2's vocabulary size even if the generated text yields fewer merges
    config = GPT2Config(vocab_size=max(vocab, len(tok)), n_positions=1024, bos_token_id=tok.eos_token_id,
                        eos_token_id=tok.eos_token_id, **shape)
    base, chat = work / "model", work / "model-chat"
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    model.save_pretrained(str(base))
    tok.save_pretrained(str(base))
    setup = prepare_tokenizer(tok)
    fit_model_to_tokenizer(model, tok, setup)
    model.save_pretrained(str(chat))
    tok.save_pretrained(str(chat))
    return {"data_dir": str(data), "base_dir": str(base), "chat_model_dir": str(chat),
            "vocab_size": config.vocab_size}


def plan(smoke: bool, budget: float) -> list[dict]:
    """(name, recipe, spec overrides) for each run."""
    short = max(5.0, budget / 2)
    runs = [
        {"name": "len1024/tutorial", "recipe": "tutorial", "max_length": 1024, "budget_s": budget},
        {"name": "len1024/trl-gpu", "recipe": "trl-gpu", "max_length": 1024, "budget_s": budget},
        {"name": "len1024/chattune", "recipe": "chattune", "max_length": 1024, "budget_s": budget,
         "chattune_batch_size": "auto", "logging_steps": 5},
        {"name": "len1024/chattune-compile", "recipe": "chattune", "max_length": 1024, "budget_s": budget * 1.5,
         "chattune_batch_size": "auto", "compile": True, "warmup": 16},
        {"name": "len128/tutorial", "recipe": "tutorial", "max_length": 128, "budget_s": short},
        {"name": "len128/trl-gpu", "recipe": "trl-gpu", "max_length": 128, "budget_s": short},
        {"name": "len128/chattune", "recipe": "chattune", "max_length": 128, "budget_s": short,
         "chattune_batch_size": "auto"},
        {"name": "fp16/chattune", "recipe": "chattune", "max_length": 1024, "budget_s": budget,
         "chattune_batch_size": "auto", "precision": "fp16", "logging_steps": 5},
    ]
    if smoke:
        for r in runs:
            r["max_length"] = min(r["max_length"], 256) if r["max_length"] > 128 else 64
            r["budget_s"] = 6.0
            r.pop("warmup", None)
        runs = [r for r in runs if "compile" not in r["name"]]  # inductor on 2 busy CPU cores: minutes
    return runs


def mfu(result: dict, shape: dict, peak: float | None) -> float | None:
    from measure import flops_per_token

    if not peak or not result.get("real_tokens_per_s"):
        return None
    share = result["assistant_tokens"] / max(1, result["real_tokens"]) if result["recipe"] == "chattune" else 1.0
    fpt = flops_per_token(shape, result["token_weighted_row_length"] or 0, share)
    return fpt * result["real_tokens_per_s"] / (peak * 1e12)


def curve_gap(a: list, b: list) -> float | None:
    """Largest relative difference of two loss curves at the steps both logged."""
    da, db = dict(map(tuple, a or [])), dict(map(tuple, b or []))
    common = sorted(set(da) & set(db))
    if not common:
        return None
    return max(abs(da[s] - db[s]) / max(abs(db[s]), 1e-9) for s in common)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny model, data and budgets (runs on a CPU)")
    p.add_argument("--budget", type=float, default=30.0, help="wall-clock seconds of training per run at 1024")
    p.add_argument("--only", help="comma-separated run names (e.g. len1024/chattune,fp16/chattune)")
    p.add_argument("--peak-tflops", type=float, help="the card's dense bf16 peak, if its name is not in the table")
    # on the device machine only files under $OUT come back
    p.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT")
                   else HERE / "results" / "gpu_check.json")
    args = p.parse_args(argv)

    import torch

    import chattune.model.speed  # noqa: F401  (fails early when chattune or its dependencies are missing)
    from train_speed import run_recipe

    started = time.perf_counter()
    shape = {"n_layer": 12, "n_embd": 768, "n_head": 12}
    vocab, n_rows, n_heldout, warmup = 50257, 4000, 64, 8
    if args.smoke:
        shape, vocab, n_rows, n_heldout, warmup = {"n_layer": 2, "n_embd": 64, "n_head": 2}, 2000, 300, 8, 1
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if cuda else "cpu"
    peak = args.peak_tflops or (bf16_peak(device) if cuda else None)
    log(f"device: {device}; torch {torch.__version__}; dense bf16 peak used for MFU: {peak} TFLOP/s")
    results = {"device": device, "torch": torch.__version__, "peak_bf16_tflops": peak, "shape": shape, "runs": {}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        assets = build(Path(tmp), n_rows, n_heldout, vocab, shape)
        shape = {**shape, "vocab_size": assets.pop("vocab_size")}
        results["shape"] = shape
        log(f"data and model built in {time.perf_counter() - started:.0f} s")
        for run in plan(args.smoke, args.budget):
            if args.only and run["name"] not in args.only.split(","):
                continue
            spec = {**assets, "seed": 0, "max_steps": 2000, "warmup": warmup, "min_measured": 1,
                    **{k: v for k, v in run.items() if k not in ("name", "recipe")}}
            try:
                try:
                    r = run_recipe(run["recipe"], spec, timeout=spec["budget_s"] * 3 + 240)
                except RuntimeError as e:
                    if run["recipe"] != "trl-gpu":
                        raise
                    # Liger's kernels may not fit this torch / transformers: TRL's best without them
                    log(f"{run['name']}: failed ({str(e)[-300:]}); again without Liger kernels")
                    r = run_recipe(run["recipe"], {**spec, "liger": False}, timeout=spec["budget_s"] * 3 + 240)
                    r["first_try_error"] = str(e)[-2000:]
            except Exception as e:  # one failing recipe must not lose the others' figures
                log(f"{run['name']}: FAILED {str(e)[-2000:]}")
                results["runs"][run["name"]] = {"error": str(e)[-4000:]}
                continue
            r["mfu"] = mfu(r, shape, peak)
            results["runs"][run["name"]] = r
            log(f"{run['name']}: {r['real_tokens_per_s'] or 0:.0f} real tokens/s, MFU "
                f"{r['mfu'] if r['mfu'] is None else format(r['mfu'], '.1%')}, padding {r['padding_share'] or 0:.1%}, "
                f"peak GPU memory {r.get('peak_gpu_memory_gib')}, held-out loss {r['heldout']['loss']:.4f}, "
                f"{r['steps']} steps; {' | '.join(r.get('log_lines', []))}")
            args.out.write_text(json.dumps(results, indent=2))  # partial results survive a timeout
    runs = results["runs"]
    ours, trl = runs.get("len1024/chattune", {}), runs.get("len1024/trl-gpu", {})
    if ours.get("real_tokens_per_s") and trl.get("real_tokens_per_s"):
        results["chattune_over_trl_real_tokens_per_s"] = ours["real_tokens_per_s"] / trl["real_tokens_per_s"]
    fp16 = runs.get("fp16/chattune", {})
    results["fp16_vs_bf16_max_relative_loss_gap"] = curve_gap(fp16.get("train_losses"), ours.get("train_losses"))
    results["seconds"] = time.perf_counter() - started
    args.out.write_text(json.dumps(results, indent=2))
    log(f"done in {results['seconds']:.0f} s; {args.out}")
    return results


if __name__ == "__main__":
    main()
