"""Training speed on a CPU: the tutorial's recipe, TRL's SFTTrainer defaults and chattune, same data.

    python bench/train_speed.py                  # small GPT-2 shape (4 layers, d=256), 3 repetitions
    python bench/train_speed.py --shape 124m     # the real GPT-2 124M shape, 1 repetition
    python bench/train_speed.py --quick          # smoke test: small vocabulary and budgets (~2 min)

It generates ultrachat-like conversations (ultrachat_like.py: lengths log-normal with median ~922 and
p95 ~2534 tokens, a GPT-2-sized byte-level BPE tokenizer trained on them), builds a randomly
initialised GPT-2-shaped model (saved like the gpt2 hub repo), and runs each recipe in its own
process (recipes.py) for the same wall-clock budget on the same conversations, 16 per optimizer step,
with fixed seeds. The order of the recipes rotates between repetitions; figures are medians.
Results: bench/results/train_speed-SHAPE.json and .md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

SHAPES = {
    "small": {"n_layer": 4, "n_embd": 256, "n_head": 4},
    "124m": {"n_layer": 12, "n_embd": 768, "n_head": 12},
}
# per shape: wall-clock budget per run (s), micro-batches left out of the timing, repetitions
PLANS = {
    "small": {"budget_s": 150, "warmup": 1, "min_measured": 2, "reps": 3, "n_train": 640, "n_heldout": 32},
    "124m": {"budget_s": 480, "warmup": 1, "min_measured": 1, "reps": 1, "n_train": 640, "n_heldout": 16},
    "quick": {"budget_s": 12, "warmup": 1, "min_measured": 1, "reps": 1, "n_train": 96, "n_heldout": 8},
}
RECIPES = ("tutorial", "trl", "chattune")
ALL_RECIPES = RECIPES + ("chattune-attn-dropout",)  # --recipes can add chattune with gpt2's attention dropout


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build_data(work: Path, n_train: int, n_heldout: int, vocab: int, seed: int) -> tuple[Path, Path, dict]:
    """Train/held-out splits in the ultrachat_200k layout (train_gen/test_gen) and the tokenizer."""
    import pyarrow.parquet as pq

    import ultrachat_like
    from chattune.demo.assets import write_hub_layout

    meta = ultrachat_like.build(work, n_train + n_heldout, seed=seed, vocab_size=vocab, log=log)
    out = work / f"speed-data-{n_train}-{n_heldout}-{seed}-{vocab}"
    if not (out / "README.md").is_file():
        rows = pq.read_table(next((Path(meta["data"]) / "data").glob("*.parquet"))).to_pylist()
        write_hub_layout({"train_gen": rows[:n_train], "test_gen": rows[n_train:]}, out)
    return out, Path(meta["tokenizer"]), meta


def build_models(work: Path, tokenizer_dir: Path, shape: str, seed: int) -> tuple[Path, Path, dict]:
    """A gpt2-like directory (tokenizer without chat template or pad; random weights), and the same
    model fitted to chattune's chat template (for TRL, which needs a template gpt2 lacks)."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from chattune.data.template import prepare_tokenizer
    from chattune.model.load import fit_model_to_tokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = GPT2Config(vocab_size=len(tok), n_positions=1024, bos_token_id=tok.eos_token_id,
                        eos_token_id=tok.eos_token_id, **SHAPES[shape])
    base, chat = work / f"model-{shape}-{len(tok)}-{seed}", work / f"model-{shape}-{len(tok)}-{seed}-chat"
    if not (chat / "config.json").is_file():
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
        model.save_pretrained(str(base))
        tok.save_pretrained(str(base))
        setup = prepare_tokenizer(tok)
        torch.manual_seed(seed)
        fit_model_to_tokenizer(model, tok, setup)
        model.save_pretrained(str(chat))
        tok.save_pretrained(str(chat))
    return base, chat, {"vocab_size": len(AutoTokenizer.from_pretrained(str(base))), **SHAPES[shape]}


def run_recipe(recipe: str, spec: dict, timeout: float) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"speed-{recipe}-") as tmp:
        spec = {**spec, "work_dir": tmp}
        (Path(tmp) / "spec.json").write_text(json.dumps(spec))
        result_file = Path(tmp) / "result.json"
        cmd = [sys.executable, str(HERE / "recipes.py"), recipe, str(Path(tmp) / "spec.json"), str(result_file)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not result_file.is_file():
            raise RuntimeError(f"{recipe} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        return json.loads(result_file.read_text())


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(runs: list[dict], shape: dict) -> dict:
    from measure import flops_per_token

    out = {}
    for recipe in ALL_RECIPES:
        rs = [r for r in runs if r["recipe"] == recipe]
        if not rs:
            continue
        row = {k: median([r[k] for r in rs]) for k in ("real_tokens_per_s", "assistant_tokens_per_s", "padding_share",
                                                        "peak_rss_gib", "train_seconds", "steps", "matmul_gflops",
                                                        "measured_micro_batches", "token_weighted_row_length")}
        row["heldout_loss"] = median([r["heldout"]["loss"] for r in rs])
        row["real_tokens_per_s_all"] = [round(r["real_tokens_per_s"] or 0, 1) for r in rs]
        row["rows_not_found"] = sum(r["rows_not_found"] for r in rs)
        # the head's useful work: every position for recipes that train on every token, loss positions for chattune
        # MFU of each run against the matmul ceiling measured in that run's process just before it trained
        mfu, fpts = [], []
        for r in rs:
            share = r["assistant_tokens"] / max(1, r["real_tokens"]) if recipe.startswith("chattune") else 1.0
            fpts.append(flops_per_token(shape, r["token_weighted_row_length"] or 0, share))
            mfu.append(fpts[-1] * (r["real_tokens_per_s"] or 0) / (r["matmul_gflops"] * 1e9))
        row["gflop_per_real_token"] = median(fpts) / 1e9
        row["mfu"] = median(mfu)
        out[recipe] = row
    return out


def table(summary: dict, ratios: dict) -> str:
    lines = ["| recipe | real tokens/s | assistant tokens/s | padding | peak RSS GiB | MFU | held-out loss | "
             "steps in budget |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for recipe, r in summary.items():
        lines.append(f"| {recipe} | {r['real_tokens_per_s']:.0f} | {r['assistant_tokens_per_s']:.0f} | "
                     f"{r['padding_share']:.1%} | {r['peak_rss_gib']:.2f} | {r['mfu']:.1%} | {r['heldout_loss']:.4f} | "
                     f"{r['steps']:.0f} |")
    lines.append("")
    lines += [f"- {k}: {v:.2f}x" for k, v in ratios.items()]
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=tuple(SHAPES), default="small")
    p.add_argument("--quick", action="store_true", help="smoke test: small vocabulary, data and budgets")
    p.add_argument("--reps", type=int, help="repetitions (default: 3 for small, 1 for 124m)")
    p.add_argument("--budget", type=float, help="wall-clock seconds of training per run")
    p.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated, from " + ",".join(ALL_RECIPES))
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=Path.home() / ".cache" / "chattune" / "bench",
                   help="where the generated data, tokenizer and models live (reused between runs)")
    p.add_argument("--results", type=Path, default=HERE / "results")
    args = p.parse_args(argv)
    plan = dict(PLANS["quick" if args.quick else args.shape])
    plan["reps"] = args.reps or plan["reps"]
    plan["budget_s"] = args.budget or plan["budget_s"]
    vocab = 8192 if args.quick else 50257
    max_length = min(args.max_length, 512) if args.quick else args.max_length

    import torch

    from measure import matmul_ceiling

    data_dir, tok_dir, data_meta = build_data(args.work, plan["n_train"], plan["n_heldout"], vocab, args.seed)
    base, chat, shape = build_models(args.work, tok_dir, args.shape, args.seed)
    ceiling = matmul_ceiling()
    log(f"fp32 matmul ceiling {ceiling:.1f} GFLOP/s with {torch.get_num_threads()} threads (each run measures its "
        f"own too); shape {shape}")
    spec = {"base_dir": str(base), "chat_model_dir": str(chat), "data_dir": str(data_dir), "max_length": max_length,
            "max_steps": max(2, plan["n_train"] // 16), "seed": args.seed, "budget_s": plan["budget_s"],
            "warmup": plan["warmup"], "min_measured": plan["min_measured"]}
    recipes = [r for r in ALL_RECIPES if r in args.recipes.split(",")]
    runs = []
    for rep in range(plan["reps"]):
        order = recipes[rep % len(recipes):] + recipes[:rep % len(recipes)]
        for recipe in order:
            log(f"rep {rep + 1}/{plan['reps']}: {recipe} ({plan['budget_s']:.0f} s budget)")
            r = run_recipe(recipe, spec, timeout=plan["budget_s"] * 4 + 600)
            r["rep"] = rep
            runs.append(r)
            log(f"  {r['real_tokens_per_s']:.0f} real tokens/s (matmul {r['matmul_gflops']:.0f} GFLOP/s), padding "
                f"{r['padding_share']:.1%}, peak RSS "
                f"{r['peak_rss_gib']:.2f} GiB, {r['steps']} steps, held-out loss {r['heldout']['loss']:.4f}")
    summary = summarize(runs, shape)
    ratios = {}
    for ours in (r for r in summary if r.startswith("chattune")):
        for other in ("tutorial", "trl"):
            if other in summary:
                ratios[f"{ours}/{other} real tokens/s"] = (summary[ours]["real_tokens_per_s"]
                                                          / summary[other]["real_tokens_per_s"])
                ratios[f"{ours}/{other} peak RSS"] = summary[ours]["peak_rss_gib"] / summary[other]["peak_rss_gib"]
    name = "quick" if args.quick else args.shape
    result = {"command": "python bench/train_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": {"cpu": cpu_name(), "threads": torch.get_num_threads(),
                          "torch": torch.__version__, "matmul_gflops": ceiling},
              "shape": shape, "plan": plan, "max_length": max_length, "data": data_meta,
              "summary": summary, "ratios": ratios, "runs": runs}
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"train_speed-{name}.json").write_text(json.dumps(result, indent=2))
    text = table(summary, ratios)
    (args.results / f"train_speed-{name}.md").write_text(text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    main()
