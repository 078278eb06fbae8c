"""GPU check: chattune's training path on the GPT-2 124M shape on one CUDA GPU; tokens/s, MFU, memory.

    bash bench/gpu_check.sh                 # on the GPU machine (installs the wheels in .whl first)
    python bench/gpu_check.py --smoke       # anywhere, tiny settings: checks the script itself

It generates ultrachat-like conversations (ultrachat_like.py) and a byte-level BPE tokenizer with
GPT-2's vocabulary size, builds a randomly initialised GPT-2 124M locally, and runs
`chattune.commands.train.run_train` (bf16 autocast, SDPA with the causal fast path, the selective LM head,
TF32, fused AdamW: what chattune picks on CUDA) for a bounded number of steps, once per batch
layout. Timing comes from measure.Meter, as in train_speed.py, with the GPU synchronised at the
window's ends. MFU is against the card's dense bf16 peak (looked up from its name; --peak-tflops
overrides). The default run took 51 s on an H200, data and model building included.
"""

from __future__ import annotations

import argparse
import gc
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
              ("L40S", 362.0), ("A10G", 125.0), ("L4", 121.0), ("RTX 4090", 165.0))


def bf16_peak(name: str) -> float | None:
    for key, peak in BF16_PEAKS:
        if key in name:
            return peak
    return None


def build(work: Path, n_rows: int, vocab: int, shape: dict, seed: int = 0) -> tuple[Path, Path]:
    """Data in the ultrachat_200k layout, and a gpt2-like model directory (no chat template, no pad)."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    import ultrachat_like
    from chattune.demo.assets import write_hub_layout

    gen = ultrachat_like.Generator(seed, n_sentences=20_000)
    tok_dir = work / "tokenizer"
    sample = [m["content"] for row in gen.rows(min(1500, n_rows)) for m in row["messages"]]
    ultrachat_like.train_gpt2_like_tokenizer(sample, tok_dir, vocab)
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    probe = gen.sentences[:5000]
    gen.tokens_per_sentence = sum(len(x) for x in tok(probe)["input_ids"]) / len(probe)
    data = write_hub_layout({"train_gen": list(gen.rows(n_rows))}, work / "data")
    torch.manual_seed(seed)
    # the model keeps GPT-2's vocabulary size even if the generated text yields fewer merges
    config = GPT2Config(vocab_size=max(vocab, len(tok)), n_positions=1024, bos_token_id=tok.eos_token_id,
                        eos_token_id=tok.eos_token_id, **shape)
    model_dir = work / "model"
    GPT2LMHeadModel(config).save_pretrained(str(model_dir))
    tok.save_pretrained(str(model_dir))
    return data, model_dir


class StepProfiler:
    """A TrainerCallback (duck-typed) that profiles optimizer steps [start, start + n) and writes the tables."""

    def __init__(self, path: Path, start: int = 10, n: int = 3):
        self.path, self.start, self.n, self.prof = path, start, n, None

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.start and self.prof is None:
            import torch

            acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                            if torch.cuda.is_available() else [])
            self.prof = torch.profiler.profile(activities=acts)
            self.prof.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        if self.prof and state.global_step == self.start + self.n:
            self.prof.__exit__(None, None, None)
            table = self.prof.key_averages()
            text = [f"{self.n} optimizer steps from step {self.start}"]
            for key in ("cpu_time_total", "self_cpu_time_total", "self_device_time_total"):
                text.append(f"\n== sorted by {key}\n"
                            + table.table(sort_by=key, row_limit=30, max_name_column_width=70))
            self.path.write_text("\n".join(text))
            self.prof = False

    def __getattr__(self, name):
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)


def run(data: Path, model_dir: Path, out: Path, batch: int, accum: int, steps: int, warmup: int, budget_s: float,
        max_length: int, profile: Path | None = None) -> dict:
    import datasets
    from transformers import AutoTokenizer

    import measure
    from chattune.commands.train import run_train
    from chattune.config import Config, validate
    from chattune.data.template import prepare_tokenizer
    from chattune.data.tokenize import encode_conversations

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    prepare_tokenizer(tok)
    rows = encode_conversations(tok, datasets.load_dataset(str(data), split="train_gen")["messages"], max_length)
    table = {measure.row_key(i): (len(i), sum(1 for t in lab if t != -100))
             for i, lab in zip(rows["input_ids"], rows["labels"])}
    meter = measure.Meter(table, budget_s, warmup, min_measured=1)
    measure.install(meter)
    if profile is not None:
        import transformers.trainer

        transformers.trainer.DEFAULT_CALLBACKS.append(StepProfiler(profile))
    cfg = Config()
    cfg.model.name, cfg.data.dataset, cfg.data.max_length = str(model_dir), str(data), max_length
    cfg.data.train_split = "train_gen"
    t = cfg.train
    t.output_dir, t.batch_size, t.grad_accum, t.max_steps, t.logging_steps = str(out), batch, accum, steps, 10
    t.save_steps = 10 ** 6  # no checkpoint inside the timed window
    try:
        run_train(validate(cfg))
    except measure.BudgetSpent:
        pass
    finally:
        import transformers.trainer

        transformers.trainer.DEFAULT_CALLBACKS[:] = [c for c in transformers.trainer.DEFAULT_CALLBACKS
                                                     if c is not meter and not isinstance(c, StepProfiler)]
    return meter.finish()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny model, data and step counts (runs on a CPU)")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per layout")
    p.add_argument("--layouts", default="4x4,16x1", help="per-device batch x accumulation (16 conversations a step)")
    p.add_argument("--profile", action="store_true",
                   help="also profile 3 optimizer steps of each layout (tables next to --out; those steps run "
                        "slower: for diagnosis, not figures)")
    p.add_argument("--peak-tflops", type=float, help="the card's dense bf16 peak, if its name is not in the table")
    # on the device machine only files under $OUT come back
    p.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT")
                   else HERE / "results" / "gpu_check.json")
    args = p.parse_args(argv)

    import torch

    import chattune.model.speed  # noqa: F401  (fails early when chattune or its dependencies are missing)
    import measure

    started = time.perf_counter()
    shape = {"n_layer": 12, "n_embd": 768, "n_head": 12}
    vocab, n_rows, max_length, warmup = 50257, 2000, 1024, 8
    if args.smoke:
        shape, vocab, n_rows, max_length, warmup = {"n_layer": 2, "n_embd": 64, "n_head": 2}, 2000, 64, 256, 1
        args.steps, args.layouts = 2, "2x2"
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    peak = args.peak_tflops or (bf16_peak(device) if torch.cuda.is_available() else None)
    print(f"device: {device}; torch {torch.__version__}; dense bf16 peak used for MFU: {peak} TFLOP/s", flush=True)
    results = {"device": device, "torch": torch.__version__, "peak_bf16_tflops": peak, "shape": shape, "layouts": {}}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        data, model_dir = build(Path(tmp), n_rows, vocab, shape)
        print(f"data and model built in {time.perf_counter() - started:.0f} s", flush=True)
        for layout in args.layouts.split(","):
            batch, accum = (int(x) for x in layout.split("x"))
            gc.collect()  # the previous layout's model and optimizer
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            prof = args.out.parent / f"profile-{layout}.txt" if args.profile else None
            args.out.parent.mkdir(parents=True, exist_ok=True)
            r = run(data, model_dir, Path(tmp) / f"out-{layout}", batch, accum, args.steps, warmup, 150.0, max_length,
                    prof)
            share = r["assistant_tokens"] / max(1, r["real_tokens"])
            fpt = measure.flops_per_token({**shape, "vocab_size": vocab + 2}, r["token_weighted_row_length"] or 0,
                                          share)
            r["gflop_per_real_token"] = fpt / 1e9
            r["mfu"] = fpt * (r["real_tokens_per_s"] or 0) / (peak * 1e12) if peak else None
            r["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
            results["layouts"][layout] = r
            mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
            mem = f"{r['peak_gpu_memory_gib']:.1f} GiB" if r["peak_gpu_memory_gib"] is not None else "n/a"
            print(f"batch {batch} x accumulation {accum}: {r['real_tokens_per_s']:.0f} real tokens/s, "
                  f"{r['assistant_tokens_per_s']:.0f} assistant tokens/s, padding {r['padding_share']:.1%}, MFU {mfu}, "
                  f"peak GPU memory {mem} ({r['measured_micro_batches']} micro-batches timed)", flush=True)
    results["seconds"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"done in {results['seconds']:.0f} s; {args.out}")
    return results


if __name__ == "__main__":
    main()
