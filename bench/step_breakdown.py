"""Where one optimizer step's time goes: chattune's training path (the quickstart's own config through
`run_train`) against a plain PyTorch loop (forward with labels, backward, clip, fused AdamW, schedule; no
Trainer) on the same tokens, model and batch size. Wall and main-thread CPU per component, per step.

    OMP_NUM_THREADS=1 python bench/step_breakdown.py --steps 200 --json bench/results/step_breakdown.json

Per step = time inside the loop / optimizer steps, so data loading, logging, callbacks, evaluation and the
checkpoint are in it (amortised over the run, as in a quickstart run of the same length). CPU time is the
main thread's (with one torch thread, all of the compute): it holds still when other processes load the
machine, wall clock does not.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path


class Timers:
    """Wall and thread-CPU time of named functions, inclusive and exclusive of wrapped calls inside them."""

    def __init__(self):
        self.incl, self.excl, self.cpu = (collections.defaultdict(float) for _ in range(3))
        self.calls = collections.Counter()
        self.stack: list[list] = []
        self.order: list[str] = []
        self.enabled = True

    def wrap(self, owner, attr: str, label: str):
        original = getattr(owner, attr)
        timers = self
        if label not in self.order:
            self.order.append(label)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            if not timers.enabled:
                return original(*args, **kwargs)
            frame = [label, 0.0]
            timers.stack.append(frame)
            t0, c0 = time.perf_counter(), time.thread_time()
            try:
                return original(*args, **kwargs)
            finally:
                dt, dc = time.perf_counter() - t0, time.thread_time() - c0
                timers.stack.pop()
                timers.incl[label] += dt
                timers.cpu[label] += dc
                timers.excl[label] += dt - frame[1]
                timers.calls[label] += 1
                if timers.stack:
                    timers.stack[-1][1] += dt

        setattr(owner, attr, timed)

    def table(self, steps: int) -> list[dict]:
        return [{"component": k, "calls_per_step": round(self.calls[k] / steps, 3),
                 "wall_ms": round(1000 * self.incl[k] / steps, 2),
                 "wall_excl_ms": round(1000 * self.excl[k] / steps, 2),
                 "cpu_ms": round(1000 * self.cpu[k] / steps, 2)}
                for k in self.order if k in self.incl]


def instrument_chattune(t: Timers) -> None:
    import accelerate.optimizer as acc_opt
    import torch
    from accelerate import Accelerator
    from transformers import Trainer, trainer_callback

    from chattune.data import collate
    from chattune.model import loss
    from chattune.training import interrupts
    from chattune.training import trainer as ct

    w = t.wrap
    w(Trainer, "_inner_training_loop", "TOTAL (Trainer training loop)")
    w(Trainer, "get_batch_samples", "data: get_batch_samples (incl. collate, token count)")
    w(collate.PadCollator, "__call__", "  PadCollator")
    w(ct.ChattuneTrainer, "training_step", "training_step (incl.)")
    w(ct.ChattuneTrainer, "compute_loss", "  forward + loss (compute_loss)")
    w(loss, "linear_cross_entropy_sum", "    selective head + cross-entropy")
    w(Accelerator, "backward", "  backward")
    w(interrupts.StepControl, "observe_loss", "  StepControl.observe_loss (NaN check)")
    w(Trainer, "_clip_grad_norm", "clip_grad_norm")
    w(acc_opt.AcceleratedOptimizer, "step", "optimizer step (accelerate wrapper, incl.)")
    w(torch.optim.AdamW, "step", "  AdamW.step (fused)")
    w(torch.optim.lr_scheduler.LRScheduler, "step", "lr_scheduler.step")
    w(torch.nn.Module, "zero_grad", "zero_grad")
    w(trainer_callback.CallbackHandler, "on_step_begin", "callbacks: on_step_begin")
    w(trainer_callback.CallbackHandler, "on_pre_optimizer_step", "callbacks: on_pre_optimizer_step")
    w(trainer_callback.CallbackHandler, "on_optimizer_step", "callbacks: on_optimizer_step")
    w(trainer_callback.CallbackHandler, "on_step_end", "callbacks: on_step_end (incl. progress bar)")
    w(Trainer, "_maybe_log_save_evaluate", "log / evaluate / save (incl.)")
    w(Trainer, "log", "  log (metrics.jsonl, printer)")
    w(ct.ChattuneTrainer, "evaluate", "  evaluate (held-out loss: 3 in the loop, 1 after it)")
    w(Trainer, "_save_checkpoint", "  checkpoint (1 per run)")


def run_chattune(work: Path, steps: int, t: Timers) -> float:
    from chattune.commands.quickstart import quickstart_config
    from chattune.commands.train import run_train

    out = work / "chattune-out"
    shutil.rmtree(out, ignore_errors=True)
    cfg = quickstart_config(out, steps)
    cfg.model.name, cfg.data.dataset = str(work / "base-model"), str(work / "data")
    cfg.train.eval_baseline = False  # a once-per-run evaluation before training, outside the loop anyway
    instrument_chattune(t)
    started = time.perf_counter()
    run_train(cfg)
    return time.perf_counter() - started


def run_plain(work: Path, steps: int, t: Timers, selective: bool) -> float:
    import torch
    from transformers import get_scheduler

    from chattune.commands.quickstart import quickstart_config
    from chattune.data.collate import PadCollator
    from chattune.data.prepared import prepare_training_data
    from chattune.model.load import load_for_training, load_prepared_base
    from chattune.model.loss import install_selective_head
    from chattune.model.speed import prepare_for_training

    cfg = quickstart_config(work / "plain-out", steps)
    cfg.model.name, cfg.data.dataset = str(work / "base-model"), str(work / "data")
    tok, _ = load_for_training(cfg.model, lambda *_: None)
    data = prepare_training_data(cfg, tok, cfg.data.max_length, work / "plain-out", main=True)
    model, _, _ = load_prepared_base(cfg.model.name, cfg.train.seed)
    prepare_for_training(model, "cpu")
    if selective:
        install_selective_head(model)
    model.train()
    tr = cfg.train
    no_decay = lambda n: "bias" in n or ".ln_" in n or "ln_f" in n  # noqa: E731
    opt = torch.optim.AdamW(
        [{"params": [p for n, p in model.named_parameters() if not no_decay(n)], "weight_decay": tr.weight_decay},
         {"params": [p for n, p in model.named_parameters() if no_decay(n)], "weight_decay": 0.0}],
        lr=tr.lr, fused=True)
    sched = get_scheduler(tr.lr_scheduler, opt, num_warmup_steps=math.ceil(tr.warmup * steps),
                          num_training_steps=steps)
    rows = [{"input_ids": r["input_ids"], "labels": r["labels"]}
            for r in data.train_rows.select_columns(["input_ids", "labels"])]
    loader = torch.utils.data.DataLoader(rows, batch_size=tr.batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(tr.seed),
                                         collate_fn=PadCollator(tok.pad_token_id))

    class Loop:
        def data(self, it):
            try:
                return next(it[0])
            except StopIteration:
                it[0] = iter(loader)
                return next(it[0])

        def forward(self, batch):
            if not selective:
                return model(**batch).loss
            out = model(input_ids=batch["input_ids"], selective_labels=batch["labels"])
            return out["loss_sum"] / out["n_tokens"].clamp(min=1)

        def backward(self, loss):
            loss.backward()

        def clip(self):
            torch.nn.utils.clip_grad_norm_(model.parameters(), tr.max_grad_norm)

        def opt(self):
            opt.step()

        def sched(self):
            sched.step()

        def zero(self):
            opt.zero_grad(set_to_none=True)

        def loop(self, n):
            it = [iter(loader)]
            for _ in range(n):
                self.backward(self.forward(self.data(it)))
                self.clip()
                self.opt()
                self.sched()
                self.zero()

    lp = Loop()
    for k, label in (("loop", "TOTAL (plain loop)"), ("data", "data: DataLoader + PadCollator"),
                     ("forward", "forward + loss" + (" (selective head)" if selective else " (model(**batch).loss)")),
                     ("backward", "backward"), ("clip", "clip_grad_norm_"), ("opt", "AdamW.step (fused)"),
                     ("sched", "lr_scheduler.step"), ("zero", "zero_grad")):
        t.wrap(lp, k, label)
    started = time.perf_counter()
    lp.loop(steps)
    return time.perf_counter() - started


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--modes", default="plain,plain-selective,chattune")
    p.add_argument("--work", default=None, help="where to build the quickstart's assets (default: a temp dir)")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import torch

    from chattune.commands import quickstart as qs

    work = Path(a.work or tempfile.mkdtemp(prefix="step-breakdown-"))
    if not (work / "base-model").exists():
        qs.build_assets(work)
    results = {"command": "OMP_NUM_THREADS=1 python bench/step_breakdown.py " + " ".join(
                   f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items() if v is not None and k != "work"),
               "threads": torch.get_num_threads(), "steps": a.steps,
               "recipe": {"batch_size": qs.BATCH_SIZE, "lr": qs.LR, "model": qs.MODEL, "max_length": 96},
               "load_before": os.getloadavg(), "modes": {}}
    for mode in a.modes.split(","):
        # each mode in its own process: instrumenting the Trainer's classes must not leak into the next mode
        import subprocess
        import sys
        code = (f"import sys, json; sys.argv=['x']; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                f"import step_breakdown as sb; print('RESULT' + json.dumps(sb.one_mode({mode!r}, {str(work)!r}, "
                f"{a.steps})))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT")), None)
        if line is None:
            raise SystemExit(f"{mode} failed:\n{out.stderr[-3000:]}")
        results["modes"][mode] = json.loads(line[len("RESULT"):])
        r = results["modes"][mode]
        print(f"\n== {mode}: {r['total_wall_ms']:.1f} ms/step wall, {r['total_cpu_ms']:.1f} ms/step main-thread CPU")
        for row in r["rows"]:
            print(f"  {row['component']:<56s} {row['calls_per_step']:>6.2f}/step {row['wall_ms']:>8.2f} ms wall "
                  f"{row['cpu_ms']:>8.2f} ms cpu")
    results["load_after"] = os.getloadavg()
    m = results["modes"]
    if "chattune" in m and "plain" in m:
        results["chattune_over_plain_cpu"] = round(m["chattune"]["total_cpu_ms"] / m["plain"]["total_cpu_ms"], 3)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))


def one_mode(mode: str, work: str, steps: int) -> dict:
    from chattune.verbosity import quiet  # noqa: F401  (the library's own logging set-up)

    t = Timers()
    work = Path(work)
    if mode == "chattune":
        wall = run_chattune(work, steps, t)
    else:
        # five untimed steps first, as the Trainer's own first steps carry its set-up
        t.enabled = False
        run_plain(work, 5, t, mode == "plain-selective")
        t.enabled = True
        wall = run_plain(work, steps, t, mode == "plain-selective")
    rows = t.table(steps)
    total = rows[0]
    once = [r for r in rows if r["component"].startswith(("  evaluate", "  checkpoint"))]
    return {"rows": rows, "total_wall_ms": total["wall_ms"], "total_cpu_ms": total["cpu_ms"],
            "total_cpu_ms_without_eval_and_checkpoint": round(total["cpu_ms"] - sum(r["cpu_ms"] for r in once), 2),
            "seconds_incl_setup": round(wall, 1)}


if __name__ == "__main__":
    main()
