"""`chattune quickstart --task dpo`'s parts (quickstart.run_dpo_quickstart runs them): the two-stage recipe,
supervised fine-tuning then DPO, offline on a CPU in a few minutes.

Stage 1 is the quickstart on chat data whose assistant declines sums asked as bare commands ("Add 12 and 34.")
in most rows (demo/preferences.py): the model learns to decline them, as models learn over-refusal from real
chat data. Stage 2 is `chattune dpo` from that model on preference pairs laid out like
HuggingFaceH4/ultrafeedback_binarized, which prefer the right sum over a hedge (DPO's loss plus the chosen
replies' NLL: RPO, TRL's sigmoid,sft). Both are scored before and
after DPO on prompts whose sums were never trained on: held-out preference accuracy (the dpo run's own score
of test_prefs), exact match on the quickstart's 200 held-out sums, and the share of replies that decline.
"""

from __future__ import annotations

import logging
from pathlib import Path

from chattune.config import Config
from chattune.outputs import TASK_SCORE_FILE

log = logging.getLogger("chattune")
SFT_DIR, PREFS_DIR = "sft", "prefs"
# DPO for the demo (docs/dpo-quickstart.md has the measurements): the tiny model, trained from scratch, takes a
# learning rate at the quickstart's scale, not the 1e-6 of `chattune dpo`'s defaults for pre-trained models; and
# the loss adds the chosen replies' NLL to DPO's (TRL's sigmoid,sft: RPO). Plain DPO at this rate drives the
# hedges' log-probability to about -120 and the right answers' down with it: declining stops but exact match falls.
DPO_STEPS, DPO_LR, DPO_BETA, DPO_BATCH, DPO_LOSS = 60, 1e-4, 0.1, 32, "sigmoid,sft"
N_TRAIN_PAIRS = 2000


def dpo_quickstart_config(out: Path, max_steps: int | None = None, seed: int = 0) -> Config:
    from chattune.commands.dpo import defaults

    cfg = defaults()
    cfg.model.name = str(out / SFT_DIR)
    d = cfg.data
    d.dataset, d.train_split, d.eval_split, d.max_length = str(out / PREFS_DIR), "train_prefs", "test_prefs", 128
    t = cfg.train
    t.output_dir, t.max_steps, t.batch_size, t.lr, t.warmup = str(out), max_steps or DPO_STEPS, DPO_BATCH, DPO_LR, 0.1
    t.lr_scheduler, t.logging_steps, t.eval_steps, t.save_steps, t.save_total_limit = "cosine", 10, None, None, 1
    t.seed = 42 + seed
    t.group_by_length = False
    cfg.dpo.beta, cfg.dpo.loss_type = DPO_BETA, DPO_LOSS
    return cfg


def task_scores(exact: float, results: list[dict]) -> dict:
    """quickstart.score's exact match and replies -> exact match on the sums asked as commands and on the others,
    and the share of replies that decline."""
    from chattune.demo.preferences import is_command, is_hedge

    def share(rows, test):
        return sum(map(test, rows)) / len(rows) if rows else float("nan")

    commands = [r for r in results if is_command(r["question"])]
    others = [r for r in results if not is_command(r["question"])]
    return {"exact_match": exact, "declined": share(results, lambda r: is_hedge(r["reply"])),
            "exact_match_commands": share(commands, lambda r: r["correct"]),
            "exact_match_questions": share(others, lambda r: r["correct"]), "n_commands": len(commands)}


def report(sft: dict, before: dict, after: dict, samples: list[dict], dpo_result: dict, n_sums: int,
           dpo_steps: int | None, seconds: float, cpu_seconds: float) -> dict:
    from chattune.demo.preferences import is_command

    pref = dpo_result["preference"]
    return {
        "metric": "preference_accuracy", "before": pref["before"]["accuracy"], "after": pref["after"]["accuracy"],
        "n": pref["before"]["pairs"], "exact_match": {"before": before["exact_match"], "after": after["exact_match"]},
        "declined": {"before": before["declined"], "after": after["declined"]}, "n_sums": n_sums,
        "by_phrasing": {k: {"before": before[k], "after": after[k]}
                        for k in ("exact_match_commands", "exact_match_questions", "n_commands")},
        "preference": pref, "sft": {k: sft[k] for k in ("before", "after", "steps")},
        "dpo_steps": dpo_steps or DPO_STEPS, "seconds": round(seconds, 1), "cpu_seconds": round(cpu_seconds, 1),
        "sample": next((s for s in samples if is_command(s["question"])), samples[0]),
        "description": "held-out preference accuracy: share of test_prefs pairs (sums never trained on) whose "
                       "right answer the model finds likelier than the rejected reply; exact match and declined: "
                       "greedy answers to the quickstart's 200 held-out sums",
    }


def print_summary(r: dict, output_dir: str) -> None:
    s = r["sample"]
    print(f"\nheld-out preference accuracy on {r['n']} pairs: before {r['before']:.1%} -> after {r['after']:.1%}")
    print(f"exact match on {r['n_sums']} held-out sums:   before {r['exact_match']['before']:.1%} -> after "
          f"{r['exact_match']['after']:.1%}")
    print(f"replies that decline:               before {r['declined']['before']:.1%} -> after "
          f"{r['declined']['after']:.1%}   ({r['seconds']:.0f} s, {r['cpu_seconds']:.0f} CPU s)")
    print(f"sample exchange after DPO:\n  user:      {s['question']}\n  assistant: {s['reply']}"
          f"   [{'correct' if s['correct'] else 'wrong'}, expected {s['expected']}]")
    print(f"model: {output_dir}   SFT model: {Path(output_dir) / SFT_DIR}   report: "
          f"{Path(output_dir) / TASK_SCORE_FILE}")
