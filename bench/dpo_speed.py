"""`chattune dpo`'s trainer against TRL's DPOTrainer on the same preference pairs and model, each in its own process.

Model: GPT-2 shape, 4 layers, d=256, a 50,257-token byte-level BPE trained on the generated text
(bench/ultrachat_like.py's generator). Pairs: ultrafeedback-like lengths, prompt median ~150
tokens, each reply median ~250 (log-normal). Every mode trains the same number of optimizer steps
on the same pairs, batch 4 pairs; pairs/s counts the steps after the first; peak RSS is the
process's high-water mark (ru_maxrss).

Modes:
  chattune      ChattuneDPOTrainer: chattune's tokenization, log-prob head on reply rows, ref = frozen copy
  chattune-bf16 the same under bf16 autocast (this CPU has AMX bf16; chattune's own default on a CPU is fp32)
  chattune-pre  the same with --precompute-ref (no reference copy during training; the precompute pass is timed apart)
  trl           TRL's DPOTrainer with its defaults (its tokenization, its fused head over every position, ref
                loaded again from the model path, bf16 autocast on CPU and gradient checkpointing, as DPOConfig
                defaults to)
  trl-fp32      TRL's DPOTrainer with chattune's settings (fp32, no gradient checkpointing)

Usage: python bench/dpo_speed.py [--steps 8] [--modes chattune,trl-fp32,trl] [--work DIR]
                                 [--out bench/results/dpo_speed.json]
The work directory (tokenizer, model, pairs) is built once and reused. Results (raw, per mode) go to --out, with
the ratios against TRL's defaults; docs/dpo.md has the table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
WORK = Path(os.environ.get("DPO_SPEED_WORK") or Path(tempfile.gettempdir()) / "chattune-dpo-speed")
BATCH = 4


def _lognormal(rng, median, sigma, n):
    import numpy as np

    return np.maximum(8, median * np.exp(rng.normal(0, sigma, n))).astype(int)


def prepare(n_pairs: int = 400, seed: int = 0) -> Path:
    """Tokenizer, model directory and pairs (jsonl), built once and reused."""
    import numpy as np

    from chattune.data.template import prepare_tokenizer
    from chattune.demo import assets
    from chattune.model.load import fit_model_to_tokenizer
    from ultrachat_like import Generator, train_gpt2_like_tokenizer

    model_dir, pairs_file = WORK / "model", WORK / f"pairs-{n_pairs}.jsonl"
    if (model_dir / "model.safetensors").is_file() and pairs_file.is_file():
        return WORK
    WORK.mkdir(parents=True, exist_ok=True)
    gen = Generator(seed, n_sentences=60_000)
    if not (WORK / "tokenizer" / "tokenizer.json").is_file():
        print("training a 50,257-token byte-level BPE", flush=True)
        sample = [m["content"] for row in Generator(seed + 1, n_sentences=60_000).rows(3000) for m in row["messages"]]
        train_gpt2_like_tokenizer(sample, WORK / "tokenizer")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(WORK / "tokenizer"))
    per_sentence = sum(len(x) for x in tok(gen.sentences[:5000])["input_ids"]) / 5000
    rng = np.random.default_rng(seed)
    prompts, chosen, rejected = (_lognormal(rng, m, s, n_pairs) for m, s in ((150, 0.6), (250, 0.5), (250, 0.5)))
    picks = iter(rng.integers(len(gen.sentences), size=int((prompts.sum() + chosen.sum() + rejected.sum())
                                                          / per_sentence) + 10 * n_pairs).tolist())

    def text(n_tokens):
        return " ".join(gen.sentences[next(picks)] for _ in range(max(1, round(n_tokens / per_sentence))))

    with open(pairs_file, "w") as f:
        for p, c, r in zip(prompts, chosen, rejected):
            f.write(json.dumps({"prompt": [{"role": "user", "content": text(p)}],
                                "chosen": [{"role": "assistant", "content": text(c)}],
                                "rejected": [{"role": "assistant", "content": text(r)}]}) + "\n")
    setup = prepare_tokenizer(tok)
    model = assets.tiny_gpt2(len(tok), None, n_layer=4, n_embd=256, n_head=4, n_positions=1024)
    fit_model_to_tokenizer(model, tok, setup)
    model.save_pretrained(str(model_dir))
    tok.save_pretrained(str(model_dir))
    return WORK


class StepClock:
    """Wall-clock and process CPU time at the end of each optimizer step (a TrainerCallback, duck-typed).

    The CPU time is what compares runs on a shared, overloaded host: the wall clock of a step grows
    with the other jobs' load, the CPU seconds it needs much less."""

    def __init__(self):
        self.times, self.cpu = [], []

    def _mark(self):
        self.times.append(time.perf_counter())
        self.cpu.append(time.process_time())

    def on_train_begin(self, args, state, control, **kwargs):
        self._mark()

    def on_step_end(self, args, state, control, **kwargs):
        self._mark()

    def __getattr__(self, name):  # the other events: nothing to do
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_mode(mode: str, steps: int, n_pairs: int) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from chattune.data.preferences import tokenize_pairs
    from chattune.training.dpo import ChattuneDPOTrainer

    torch.manual_seed(0)
    pairs = [json.loads(line) for line in open(WORK / f"pairs-{n_pairs}.jsonl")][:steps * BATCH]
    tok = AutoTokenizer.from_pretrained(str(WORK / "model"))
    model = AutoModelForCausalLM.from_pretrained(str(WORK / "model"), dtype=torch.float32)
    common = dict(output_dir=str(WORK / f"out-{mode}"), report_to="none", use_cpu=True, max_steps=steps,
                  per_device_train_batch_size=BATCH, logging_steps=1000, save_strategy="no", seed=0,
                  dataloader_pin_memory=False, disable_tqdm=True)
    rows, _ = tokenize_pairs(tok, pairs, max_length=1024)
    lengths = {k: int(sorted(len(r[k]) for r in rows)[len(rows) // 2]) for k in ("prompt_ids", "chosen_ids")}
    if mode.startswith("chattune"):
        args = DPOConfig(**common, bf16=mode == "chattune-bf16", gradient_checkpointing=False, max_length=1024,
                         precompute_ref_log_probs=mode == "chattune-pre")
        t0 = time.perf_counter()
        trainer = ChattuneDPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                     processing_class=tok)
    else:
        extra = {} if mode == "trl" else dict(bf16=False, gradient_checkpointing=False)
        args = DPOConfig(**common, **extra)
        t0 = time.perf_counter()
        trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(pairs), processing_class=tok)
    setup_s = time.perf_counter() - t0
    clock = StepClock()
    trainer.add_callback(clock)
    rss_before = _rss_gib()
    trainer.train()
    t = clock.times
    measured = t[-1] - t[1]  # steps 2..N: the first carries one-off costs
    cpu = clock.cpu[-1] - clock.cpu[1]
    return {"mode": mode, "steps": steps, "pairs": steps * BATCH,
            "pairs_per_s": round((steps - 1) * BATCH / measured, 3),
            "seconds_per_step": round(measured / (steps - 1), 2),
            "pairs_per_cpu_s": round((steps - 1) * BATCH / cpu, 4), "cpu_s_per_step": round(cpu / (steps - 1), 2),
            "first_step_s": round(t[1] - t[0], 2),
            "setup_s": round(setup_s, 1), "peak_rss_gib": round(_rss_gib(), 3),
            "rss_before_train_gib": round(rss_before, 3), "bf16": args.bf16,
            "gradient_checkpointing": args.gradient_checkpointing, "threads": torch.get_num_threads(),
            "final_loss": trainer.state.log_history[-1].get("train_loss"),
            "median_tokens": lengths}


def _load() -> str:
    return " ".join(open("/proc/loadavg").read().split()[:3])


def main() -> None:
    global WORK
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--pairs", type=int, default=400)
    p.add_argument("--modes", default="chattune,trl-fp32,trl,chattune-pre")
    p.add_argument("--out", default=str(HERE / "results" / "dpo_speed.json"))
    p.add_argument("--work", default=str(WORK), help="tokenizer, model and pairs, built once (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=1, help="repeat the modes in turn, so load drift hits each alike")
    p.add_argument("--child", default=None)
    a = p.parse_args()
    os.environ["DPO_SPEED_WORK"] = a.work  # the child processes read it
    WORK = Path(a.work)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if a.child:
        print("RESULT " + json.dumps(run_mode(a.child, a.steps, a.pairs)), flush=True)
        return
    prepare(a.pairs)
    results = []
    for mode in a.modes.split(",") * a.rounds:
        load = _load()
        proc = subprocess.run([sys.executable, __file__, "--child", mode, "--steps", str(a.steps), "--pairs",
                               str(a.pairs), "--work", a.work], capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(proc.stdout[-2000:], proc.stderr[-4000:])
            raise SystemExit(f"{mode} failed")
        r = json.loads(line[7:]) | {"loadavg_before": load, "loadavg_after": _load()}
        print(json.dumps(r), flush=True)
        results.append(r)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"cpu": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                                       "command": " ".join(sys.argv), "results": results,
                                       "ratios_vs_trl": ratios(results)}, indent=2))
    print(json.dumps(ratios(results), indent=2))


def ratios(results: list[dict]) -> dict:
    """Each mode's mean speed (pairs per wall second and per CPU second) and peak memory against TRL's, per TRL
    mode measured."""
    def mean(mode, key):
        vals = [r[key] for r in results if r["mode"] == mode]
        return sum(vals) / len(vals) if vals else None

    modes = list(dict.fromkeys(r["mode"] for r in results))
    out = {}
    for base in (m for m in modes if m.startswith("trl")):
        for mode in (m for m in modes if m.startswith("chattune")):
            out[f"{mode} / {base}"] = {key: round(mean(mode, key) / mean(base, key), 2) for key in
                                       ("pairs_per_s", "pairs_per_cpu_s", "peak_rss_gib")}
    return out


if __name__ == "__main__":
    main()
