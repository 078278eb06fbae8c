"""`chattune quickstart --task dpo`'s parts: the scores it reports and the DPO run it configures."""

from __future__ import annotations

from pathlib import Path

from chattune.cli import build_parser
from chattune.commands import quickstart_dpo as task


def result(question, reply, correct):
    return {"question": question, "reply": reply, "correct": correct, "expected": 0}


def test_scores_split_commands_from_questions():
    rows = [result("Add 12 and 34.", "I'm not sure about that one.", False),
            result("Compute 12 + 35.", "12 + 35 = 47.", True),
            result("What is 12 + 34?", "12 + 34 = 46.", True),
            result("What is 12 + 36?", "12 + 36 = 49.", False)]
    s = task.task_scores(0.5, rows)
    assert s == {"exact_match": 0.5, "declined": 0.25, "exact_match_commands": 0.5, "exact_match_questions": 0.5,
                 "n_commands": 2}


def test_report_takes_the_dpo_runs_own_preference_accuracy():
    scores = task.task_scores(0.5, [result("Add 1 and 2.", "Sorry, I can't be certain of that sum.", False),
                                    result("What is 1 + 2?", "1 + 2 = 3.", True)])
    after = task.task_scores(1.0, [result("Add 1 and 2.", "1 + 2 = 3.", True),
                                   result("What is 1 + 2?", "1 + 2 = 3.", True)])
    pref = {"before": {"pairs": 200, "accuracy": 0.6}, "after": {"pairs": 200, "accuracy": 0.99}}
    r = task.report({"before": 0.0, "after": 0.4, "steps": 900}, scores, after,
                    [result("What is 1 + 2?", "1 + 2 = 3.", True), result("Add 1 and 2.", "1 + 2 = 3.", True)],
                    {"preference": pref}, 2, None, 10.0, 5.0)
    assert (r["before"], r["after"], r["n"]) == (0.6, 0.99, 200)
    assert r["exact_match"] == {"before": 0.5, "after": 1.0} and r["declined"] == {"before": 0.5, "after": 0.0}
    assert r["sample"]["question"] == "Add 1 and 2."  # a command: where DPO changed the behaviour
    assert r["dpo_steps"] == task.DPO_STEPS


def test_cli_takes_the_task_and_its_steps():
    args = build_parser("quickstart").parse_args(["quickstart", "--task", "dpo", "--max-steps", "5",
                                                  "--dpo-steps", "3"])
    assert (args.task, args.max_steps, args.dpo_steps) == ("dpo", 5, 3)
    assert build_parser("quickstart").parse_args(["quickstart"]).task == "addition"


def test_dpo_run_config(tmp_path: Path):
    from chattune.config import validate

    cfg = validate(task.dpo_quickstart_config(tmp_path, max_steps=7, seed=1))
    assert cfg.model.name == str(tmp_path / task.SFT_DIR) and cfg.train.output_dir == str(tmp_path)
    assert (cfg.data.dataset, cfg.data.train_split, cfg.data.eval_split) == \
        (str(tmp_path / task.PREFS_DIR), "train_prefs", "test_prefs")
    assert (cfg.train.max_steps, cfg.train.lr, cfg.dpo.beta, cfg.train.seed) == (7, task.DPO_LR, task.DPO_BETA, 43)
    assert cfg.dpo.loss_types() == ["sigmoid", "sft"]
