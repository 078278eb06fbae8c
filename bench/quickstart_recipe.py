"""The quickstart's recipe, measured: `run_quickstart` with its recipe constants overridden, the time of
each phase (wall and process CPU), and optionally the held-out exact match every N steps.

    OMP_NUM_THREADS=1 python bench/quickstart_recipe.py --seed 1 --steps 1000 --bs 64 --lr 4e-3 \
        --curve-every 100 --out bench/results/qs_recipe/s1.json

Scoring for the curve runs inside training; its time is reported separately (`curve_seconds`) and is not
part of a plain quickstart run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out-dir", default=None, help="quickstart output dir (default: a temporary one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--bs", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--warmup", type=float, default=None)
    p.add_argument("--n-train", type=int, default=None)
    p.add_argument("--n-layer", type=int, default=None)
    p.add_argument("--n-embd", type=int, default=None)
    p.add_argument("--n-head", type=int, default=None)
    p.add_argument("--scheduler", default=None)
    p.add_argument("--multi-turn", type=float, default=None)
    p.add_argument("--system", type=float, default=None)
    p.add_argument("--wd", type=float, default=None)
    p.add_argument("--curve-every", type=int, default=0)
    p.add_argument("--out", default=None, help="write the result JSON here")
    a = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    import tempfile

    from transformers import TrainerCallback

    from chattune.commands import quickstart as qs
    from chattune.demo import addition, assets
    from chattune.training import early_stop

    if a.bs:
        qs.BATCH_SIZE = a.bs
    if a.lr:
        qs.LR = a.lr
    if a.warmup is not None:
        qs.WARMUP = a.warmup
    if a.n_train:
        qs.N_TRAIN = a.n_train
    for k in ("n_layer", "n_embd", "n_head"):
        if getattr(a, k):
            qs.MODEL = {**qs.MODEL, k: getattr(a, k)}
    for k in ("multi_turn", "system"):
        if getattr(a, k) is not None:
            qs.CONVERSATIONS = {**qs.CONVERSATIONS, k: getattr(a, k)}
    config = qs.quickstart_config

    def patched_config(*args, **kw):
        cfg = config(*args, **kw)
        if a.scheduler:
            cfg.train.lr_scheduler = a.scheduler
        if a.wd is not None:
            cfg.train.weight_decay = a.wd
        return cfg
    qs.quickstart_config = patched_config

    phases: dict[str, list[float]] = {}

    def timed(name, fn):
        def wrapper(*args, **kw):
            w, c = time.perf_counter(), cpu()
            try:
                return fn(*args, **kw)
            finally:
                got = phases.setdefault(name, [0.0, 0.0])
                got[0] += time.perf_counter() - w
                got[1] += cpu() - c
        return wrapper

    addition.addition_splits = timed("data: synthesise", addition.addition_splits)
    assets.write_hub_layout = timed("data: write parquet", assets.write_hub_layout)
    assets.train_tokenizer = timed("tokenizer: train BPE", assets.train_tokenizer)
    assets.tiny_gpt2 = timed("model: build + save", assets.tiny_gpt2)
    score = qs.score
    qs.score = timed("score held-out (before + after)", qs.score)
    import chattune.commands.train as train_cmd
    original_train = train_cmd.run_train
    train_cmd.run_train = timed("run_train (all)", original_train)

    curve = []

    class Curve(TrainerCallback):
        def __init__(self, held_out):
            self.held_out = held_out
            self.seconds = 0.0
            self.t0 = time.perf_counter()
            self.c0 = cpu()

        def on_step_end(self, args, state, control, model=None, processing_class=None, **kw):
            if a.curve_every and (state.global_step % a.curve_every == 0 or state.global_step == state.max_steps):
                w = time.perf_counter()
                acc, _ = score(model.eval(), processing_class, self.held_out)
                model.train()
                self.seconds += time.perf_counter() - w
                curve.append({"step": state.global_step, "exact_match": acc,
                              "train_wall": round(time.perf_counter() - self.t0 - self.seconds, 1)})
                print(f"step {state.global_step}: exact match {acc:.1%}", flush=True)

    held = {}
    split_fn = addition.addition_splits

    def keep_splits(*args, **kw):
        s = split_fn(*args, **kw)
        held["test"] = s["test_gen"]
        return s
    addition.addition_splits = keep_splits
    callbacks = early_stop.callbacks
    cb = {}

    def more_callbacks(cfg):
        cb["curve"] = Curve(held["test"])
        return [*callbacks(cfg), cb["curve"]]
    early_stop.callbacks = more_callbacks

    out = a.out_dir or tempfile.mkdtemp(prefix="qs-recipe-")
    load0 = os.getloadavg()
    w0, c0 = time.perf_counter(), cpu()
    report = qs.run_quickstart(out, max_steps=a.steps, seed=a.seed)
    wall, cpu_s = time.perf_counter() - w0, cpu() - c0
    res = {"args": vars(a), "recipe": {"steps": report["steps"], "batch_size": qs.BATCH_SIZE, "lr": qs.LR,
                                       "warmup": qs.WARMUP, "n_train": qs.N_TRAIN, "model": qs.MODEL,
                                       "conversations": qs.CONVERSATIONS},
           "before": report["before"], "after": report["after"], "wall_seconds": round(wall, 1),
           "cpu_seconds": round(cpu_s, 1), "threads": int(os.environ.get("OMP_NUM_THREADS", 0)) or None,
           "load_before": load0, "load_after": os.getloadavg(),
           "phases": {k: {"wall": round(v[0], 1), "cpu": round(v[1], 1)} for k, v in phases.items()},
           "curve": curve, "curve_seconds": round(cb["curve"].seconds, 1) if cb else 0.0}
    print(json.dumps({k: res[k] for k in ("recipe", "before", "after", "wall_seconds", "cpu_seconds", "phases")}))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
