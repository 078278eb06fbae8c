"""`chattune quickstart`: the whole job offline on a CPU in a few minutes.

It builds a small GPT-2 and a chat data set that teaches two-digit addition (laid out like gpt2 and
ultrachat_200k on the hub), fine-tunes with the same `train` code path as any run, and scores the
exact-match rate of answers to held-out sums before and after training. `--task tools` does the same for
tool calling (quickstart_tools.py): the model learns to call a calculator tool with the right arguments.
`--task dpo` runs the two-stage recipe, SFT then `chattune dpo` (quickstart_dpo.py): DPO removes a behaviour
the SFT data taught, declining sums asked as commands.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from chattune.config import Config, validate
from chattune.demo import addition, assets
from chattune.errors import ChattuneError
from chattune.outputs import LOCK_FILE, QUICKSTART_MARKER, REPLACED_SUFFIX, TASK_SCORE_FILE
from chattune.verbosity import quiet

log = logging.getLogger("chattune")
METRIC = "addition_exact_match"
# the recipe (issue 16 item 4; bench/results/quickstart.json, docs/performance.md#the-quickstart)
DEFAULT_STEPS = 1200
BATCH_SIZE, LR, WARMUP = 64, 4e-3, 0.05
# enough conversations that a run sees most only once: with 4,000 the model memorised the pairs it saw
# before it learned to add, and held-out sums lagged
N_TRAIN = 40_000
CONVERSATIONS = {"multi_turn": 0.25, "system": 0.2}
MODEL = {"n_layer": 2, "n_embd": 128, "n_head": 4}


def add_arguments(p) -> None:
    p.add_argument("--output-dir", default="quickstart-out", help="where to build and train (default: %(default)s)")
    p.add_argument("--max-steps", type=int, default=None,
                   help=f"optimizer steps (default: {DEFAULT_STEPS}; 1000 for --task tools)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier quickstart in --output-dir: it is moved (never deleted) to a new sibling "
                        "OUTPUT.replaced-DATE-TIME")
    p.add_argument("--task", choices=("addition", "tools", "dpo"), default="addition",
                   help="addition: answer sums (default); tools: call an add(a, b) tool with the right arguments and "
                        "answer with its result; dpo: the two-stage recipe, fine-tuning on chat data that teaches the "
                        "model to decline some sums, then `chattune dpo` on preference pairs that prefer the answer "
                        "(--max-steps: the first stage)")
    p.add_argument("--dpo-steps", type=int, default=None, help="--task dpo: DPO optimizer steps (default: 60)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed for the data, the model's initial weights and the training order (default: %(default)s)")


def run(args) -> int:
    check_max_steps(args.max_steps)  # before run_quickstart's heavy imports
    if getattr(args, "task", "addition") == "tools":
        from chattune.commands.quickstart_tools import print_result

        print_result(run_tool_quickstart(args.output_dir, max_steps=args.max_steps, overwrite=args.overwrite),
                     args.output_dir)
        return 0
    if getattr(args, "task", "addition") == "dpo":
        from chattune.commands.quickstart_dpo import print_summary

        check_max_steps(args.dpo_steps)
        print_summary(run_dpo_quickstart(args.output_dir, max_steps=args.max_steps, dpo_steps=args.dpo_steps,
                                         seed=args.seed, overwrite=args.overwrite), args.output_dir)
        return 0
    r = run_quickstart(args.output_dir, max_steps=args.max_steps, overwrite=args.overwrite, seed=args.seed)
    s = r["sample"]
    print(f"\n{r['metric']} on {r['n']} held-out sums: before {r['before']:.1%} -> after {r['after']:.1%} "
          f"({r['seconds']:.0f} s)")
    print(f"sample exchange:\n  user:      {s['question']}\n  assistant: {s['reply']}"
          f"   [{'correct' if s['correct'] else 'wrong'}, expected {s['expected']}]")
    print(f"model: {args.output_dir}   report: {os.path.join(args.output_dir, TASK_SCORE_FILE)}")
    return 0


def quickstart_config(out: Path, max_steps: int | None = None, seed: int = 0) -> Config:
    cfg = Config()
    cfg.model.name = str(out / "base-model")
    d = cfg.data
    d.dataset, d.train_split, d.eval_split, d.max_length = str(out / "data"), "train_gen", "test_gen", 96
    t = cfg.train
    t.output_dir = str(out)
    t.batch_size, t.grad_accum, t.lr, t.warmup, t.weight_decay = BATCH_SIZE, 1, LR, WARMUP, 0.01
    t.max_steps, t.seed = DEFAULT_STEPS if max_steps is None else max_steps, seed
    # answers' lengths follow the sums, so length-grouped batches would be biased: sample at random
    t.group_by_length = False
    # three evaluations for the report's loss curve; one checkpoint, at the end (a 5-minute run needs no resume point)
    t.lr_scheduler, t.logging_steps, t.save_total_limit = "cosine", 50, 1
    t.eval_steps = max(1, -(-t.max_steps // 3))
    t.save_steps = t.max_steps
    return validate(cfg)


def score(model, tokenizer, rows: list[dict], batch_size: int = 50) -> tuple[float, list[dict]]:
    """Exact-match rate of the sum in the reply to each held-out question (greedy decoding)."""
    from chattune.inference.generate import generate_replies

    # the conversation up to its first reply: [system,] user question
    prompts = [r["messages"][:next(i for i, m in enumerate(r["messages"]) if m["role"] == "assistant")]
               for r in rows]
    replies = generate_replies(model, tokenizer, prompts, max_new_tokens=16, batch_size=batch_size)
    results = []
    for prompt, r in zip(prompts, replies):
        a, b = map(int, addition.NUMBER.findall(prompt[-1]["content"])[:2])
        results.append({"question": prompt[-1]["content"], "expected": a + b, "reply": r["reply"],
                        "correct": addition.answer_of(r["reply"]) == a + b})
    return sum(x["correct"] for x in results) / len(results), results


def check_max_steps(max_steps: int | None) -> None:
    if max_steps is not None and max_steps < 1:
        raise ChattuneError(f"--max-steps must be at least 1, got {max_steps}")


def prepare_output_dir(out: Path, overwrite: bool = False) -> None:
    """An empty folder to build in: an earlier quickstart is moved aside with --overwrite and kept otherwise;
    any other non-empty folder is refused. (Call it holding the folder's RunLock.)"""
    from chattune.training.rundir import set_aside

    out = Path(out)
    entries = [p for p in out.iterdir() if p.name != LOCK_FILE] if out.is_dir() else []
    if not entries:
        return
    if not (out / QUICKSTART_MARKER).exists():
        raise ChattuneError(f"{out} is not empty and not an earlier quickstart; choose another --output-dir")
    if not overwrite:
        raise ChattuneError(f"{out} holds an earlier quickstart: pass --overwrite to move it to "
                            f"{out.name}{REPLACED_SUFFIX}DATE-TIME and start afresh, or choose another --output-dir")
    set_aside(out, entries)


def compute_threads(default: int) -> int:
    """No more torch threads than idle cores: on a busy machine an OpenMP thread waits, spinning, for a sibling
    that is not running (with 2 threads on 2 cores at load 4, a step took 0.53 s and twice the CPU time of
    one thread's 0.3 s; docs/performance.md#the-quickstart)."""
    try:
        idle = (os.cpu_count() or 1) - os.getloadavg()[0] + 1  # this process counts in the load
    except OSError:  # no load average on this platform
        return default
    return max(1, min(default, round(idle)))


def recipe_splits(n_eval: int = 200, seed: int = 0) -> dict[str, list[dict]]:
    return addition.addition_splits(n_train=N_TRAIN, n_test=n_eval, seed=seed, **CONVERSATIONS)


def build_assets(out: Path, n_eval: int = 200, seed: int = 0, splits: dict | None = None) -> dict[str, list[dict]]:
    """The task's data set (OUT/data) and the base model with its tokenizer (OUT/base-model); returns the splits
    (`splits` replaces the recipe's conversations)."""
    splits = splits or recipe_splits(n_eval, seed)
    assets.write_hub_layout(splits, out / "data")
    tok = assets.train_tokenizer(list(assets.texts_of(splits, role_names_per_row=True)), out / "base-model")
    assets.tiny_gpt2(len(tok), out / "base-model", seed=seed, **MODEL)
    return splits


@quiet
def run_quickstart(output_dir: str = "quickstart-out", max_steps: int | None = None, n_eval: int = 200,
                   overwrite: bool = False, seed: int = 0, splits: dict[str, list[dict]] | None = None) -> dict:
    check_max_steps(max_steps)  # before anything is built or moved
    from chattune.training.lock import RunLock

    out = Path(output_dir)
    with RunLock(out):  # held while the folder is prepared; run_train takes it again inside
        prepare_output_dir(out, overwrite)
        return _build_train_score(out, max_steps, n_eval, seed, splits)


def _build_train_score(out: Path, max_steps: int | None, n_eval: int, seed: int = 0, splits: dict | None = None
                       ) -> dict:
    import torch

    from chattune.commands.train import run_train
    from chattune.model.hub import load_tokenizer
    from chattune.model.load import load_model, load_prepared_base

    started = time.perf_counter()
    (out / QUICKSTART_MARKER).write_text(json.dumps({"created_by": "chattune quickstart"}))
    splits = build_assets(out, n_eval, seed, splits)
    log.info(f"built {out / 'base-model'} (2-layer GPT-2, random init) and {out / 'data'} "
             f"({len(splits['train_gen'])} train / {len(splits['test_gen'])} held-out conversations)")

    torch.set_num_threads(compute_threads(torch.get_num_threads()))
    held_out = splits["test_gen"]
    cfg = quickstart_config(out, max_steps, seed)
    # set up as training sets up its base: the added tokens' rows start as the trained model's did
    base, base_tok, _ = load_prepared_base(str(out / "base-model"), cfg.train.seed)
    before, _ = score(base.eval(), base_tok, held_out)
    log.info(f"before training: {METRIC} = {before:.1%}")

    result = run_train(cfg)

    tuned_tok = load_tokenizer(str(out))
    tuned = load_model(str(out)).eval()
    after, samples = score(tuned, tuned_tok, held_out)
    report = {
        "metric": METRIC, "before": before, "after": after, "n": len(held_out),
        "eval_loss_after": result["eval"].get("eval_loss"),
        "eval_perplexity_after": result["eval"].get("eval_perplexity"),
        "steps": cfg.train.max_steps, "seed": seed, "seconds": round(time.perf_counter() - started, 1),
        "sample": samples[0], "description": "share of held-out two-digit sums (operand pairs never seen in "
                                             "training) answered exactly, greedy decoding",
    }
    (out / TASK_SCORE_FILE).write_text(json.dumps(report, indent=2))
    return report


@quiet
def run_tool_quickstart(output_dir: str = "quickstart-tools", max_steps: int | None = None, n_eval: int = 200,
                        overwrite: bool = False) -> dict:
    """`--task tools`: build the add(a, b) tool task and a base model, score held-out call accuracy, train, score
    again (commands/quickstart_tools.py holds the task's parts). The folder is prepared as run_quickstart's."""
    check_max_steps(max_steps)
    from chattune.training.lock import RunLock

    out = Path(output_dir)
    with RunLock(out):
        prepare_output_dir(out, overwrite)
        return _build_train_score_tools(out, max_steps, n_eval)


def _build_train_score_tools(out: Path, max_steps: int | None, n_eval: int) -> dict:
    import torch

    from chattune.commands import quickstart_tools as task
    from chattune.commands.train import run_train
    from chattune.model.hub import load_tokenizer
    from chattune.model.load import load_model, load_prepared_base

    started = time.perf_counter()
    (out / QUICKSTART_MARKER).write_text(json.dumps({"created_by": "chattune quickstart --task tools"}))
    held_out = task.build_assets(out, n_eval)
    torch.set_num_threads(compute_threads(torch.get_num_threads()))
    cfg = task.tool_config(out, max_steps)
    base, base_tok, _ = load_prepared_base(str(out / "base-model"), cfg.train.seed)
    before = task.score(base, base_tok, held_out, n_eval)
    log.info(f"before training: {task.METRIC} = {before['call_accuracy']:.1%}")
    result = run_train(cfg)
    after = task.score(load_model(str(out)), load_tokenizer(str(out)), held_out, n_eval)
    report = task.report(before, after, result, cfg.train.max_steps, time.perf_counter() - started)
    (out / TASK_SCORE_FILE).write_text(json.dumps(report, indent=2))
    return report


@quiet
def run_dpo_quickstart(output_dir: str = "quickstart-dpo-out", max_steps: int | None = None,
                       dpo_steps: int | None = None, seed: int = 0, overwrite: bool = False) -> dict:
    """`--task dpo`: the quickstart on chat data that teaches the model to decline sums asked as commands (OUT/sft,
    `max_steps`), then `chattune dpo` into OUT on pairs that prefer the right sum (OUT/prefs, `dpo_steps`);
    held-out preference accuracy, exact match and declined replies before and after DPO (quickstart_dpo.py)."""
    check_max_steps(max_steps)
    check_max_steps(dpo_steps)
    from chattune.training.lock import RunLock

    out = Path(output_dir)
    with RunLock(out):  # held while the folder is prepared; the sft and dpo runs take their own inside
        prepare_output_dir(out, overwrite)
        return _sft_then_dpo(out, max_steps, dpo_steps, seed)


def _sft_then_dpo(out: Path, max_steps: int | None, dpo_steps: int | None, seed: int) -> dict:
    from chattune.commands import quickstart_dpo as task
    from chattune.commands.dpo import run_dpo
    from chattune.demo import preferences
    from chattune.model.hub import load_tokenizer
    from chattune.model.load import load_model

    started, cpu_started = time.perf_counter(), time.process_time()
    (out / QUICKSTART_MARKER).write_text(json.dumps({"created_by": "chattune quickstart --task dpo"}))
    splits = preferences.hedge_splits(recipe_splits(seed=seed), seed=seed)
    log.info("stage 1: supervised fine-tuning on chat data whose assistant declines sums asked as commands")
    sft = run_quickstart(str(out / task.SFT_DIR), max_steps=max_steps, seed=seed, splits=splits)
    preferences.write_preference_data(out / task.PREFS_DIR, n_train=task.N_TRAIN_PAIRS, seed=seed)

    def scores(model_dir):
        exact, results = score(load_model(str(model_dir)).eval(), load_tokenizer(str(model_dir)), splits["test_gen"])
        return task.task_scores(exact, results), results

    before, _ = scores(out / task.SFT_DIR)
    log.info(f"after SFT: exact match {before['exact_match']:.1%}, declined {before['declined']:.1%}")
    log.info("stage 2: DPO on pairs that prefer the right sum over a hedge")
    result = run_dpo(task.dpo_quickstart_config(out, dpo_steps, seed))
    after, samples = scores(out)
    report = task.report(sft, before, after, samples, result, len(splits["test_gen"]), dpo_steps,
                         time.perf_counter() - started, time.process_time() - cpu_started)
    (out / TASK_SCORE_FILE).write_text(json.dumps(report, indent=2))
    return report
