"""`chattune dpo`: preference tuning (Direct Preference Optimization), the second stage of the Zephyr recipe,
as a recipe of the same named steps as `chattune train` (training/steps.py).

prepare the pairs (converted, checked and tokenized before any weights load) -> build the model (the SFT model
from `chattune train`, its saved chat template; LoRA as in train) -> build the trainer (TRL's DPOTrainer with
chattune's log-prob head; the reference is the starting model) -> score the held-out pairs (before) -> train ->
finish (held-out pairs scored again, the model directory, results, report and card).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from chattune.commands import TRAIN_SECTIONS, add_config_arguments, config_from_args
from chattune.config import DPO_TRAIN_DEFAULTS, Config, validate
from chattune.verbosity import quiet

log = logging.getLogger("chattune")
N_SAMPLES = 3


def add_arguments(parser) -> None:
    add_config_arguments(parser, (*TRAIN_SECTIONS, "dpo"),
                         defaults={f"train.{k}": v for k, v in DPO_TRAIN_DEFAULTS.items()})


def defaults() -> Config:
    """The config `chattune dpo` starts from: train.lr and train.epochs from the small-model DPO recipe."""
    cfg = Config()
    for k, v in DPO_TRAIN_DEFAULTS.items():
        setattr(cfg.train, k, v)
    return cfg


def run(args) -> int:
    from chattune.training.rundir import check_output_dir

    cfg = config_from_args(args, defaults())
    check_output_dir(cfg)  # a refused --output-dir answers before run_dpo's heavy imports (@quiet)
    run_dpo(cfg)
    return 0


@quiet
def run_dpo(cfg: Config) -> dict:
    """Preference-tune as `cfg` says (cfg.dpo: beta, loss type, precompute); returns the output directory, the
    final metrics and the held-out preference accuracy before and after."""
    from chattune.data.preferences import default_splits
    from chattune.errors import ConfigError
    from chattune.evaluation.preferences import preference_summary
    from chattune.training import steps
    from chattune.training.args import dpo_args
    from chattune.training.rundir import check_output_dir

    cfg = validate(cfg)
    if cfg.train.fixed_shapes or cfg.train.compile:
        raise ConfigError("--fixed-shapes and --compile are not supported by chattune dpo yet; leave them off")
    check_output_dir(cfg)  # before any data or weights load (checked again under the lock)
    note = default_splits(cfg.data)
    if note:
        log.info(note)
    steps.check_model_kind(cfg)
    steps.check_tracking_and_stopping(cfg)
    with steps.run_directory(cfg) as (state, resume):
        out = Path(cfg.train.output_dir)
        tokenizer, setup, data = prepare_pairs(cfg, out, state)
        device, precision = steps.device_and_precision(cfg)
        if cfg.train.batch_size == "auto":
            from chattune.model.batch_size import DEFAULT_MICRO

            # the memory probe measures an SFT step; a DPO step (two replies per pair, a reference) differs
            cfg.train.batch_size = DEFAULT_MICRO
            log.info(f"batch size auto: {DEFAULT_MICRO} pairs per device (DPO does not probe memory; give "
                     "--batch-size to choose)")
        log.info(f"device {device}, precision {precision}, max length {cfg.data.max_length}, beta {cfg.dpo.beta}, "
                 f"loss {cfg.dpo.loss_type}")
        if state.is_main_process:
            cfg.save(out)
        args = dpo_args(cfg, precision, data["eval_rows"] is not None, use_cpu=device == "cpu")
        model = steps.build_model(cfg, tokenizer, setup, args)
        trainer, signals, control = build_trainer(cfg, model, tokenizer, data, args, out, resume)
        before = score(cfg, trainer, tokenizer, data, state)
        if before is not None:
            log.info("held-out preference accuracy of the starting model: {accuracy:.1%} of {pairs} pairs".format(
                **preference_summary(*before)))
        result = steps.train(trainer, signals, control, resume, out, state)
        return finish(cfg, trainer, tokenizer, data, result, before, out, device, precision, state)


def prepare_pairs(cfg: Config, out: Path, state):
    """Tokenizer with its chat template, and the run's preference pairs, checked and tokenized: every problem
    stops the run here, before any weights load (or, with --skip-invalid, goes to OUTPUT/rejected.jsonl)."""
    from chattune.data.mixture import load_training_data
    from chattune.data.preferences import load_preferences, tokenize_split
    from chattune.data.prepared import write_rejected
    from chattune.errors import DataError
    from chattune.model.hub import load_config
    from chattune.model.load import context_length, load_for_training, resolve_max_length
    from chattune.outputs import REJECTED_FILE

    m = cfg.model
    cfg.data.max_length = resolve_max_length(cfg.data.max_length,
                                             context_length(load_config(m.name, m.revision, m.trust_remote_code)),
                                             m.name)
    train_split, eval_split = load_training_data(cfg, loader=load_preferences)
    n_rejected = write_rejected(out, train_split, eval_split) if state.is_main_process else 0
    if n_rejected:
        log.info(f"skipped {n_rejected} invalid row(s); each is in {out / REJECTED_FILE} with its reason")
    tokenizer, setup = load_for_training(m, log.info)
    train_rows, train_stats = tokenize_split(tokenizer, train_split, cfg.data.max_length)
    log.info(f"data: {train_split.name}; " + train_stats.summary("train"))
    eval_rows = eval_stats = None
    if eval_split is not None:
        eval_rows, eval_stats = tokenize_split(tokenizer, eval_split, cfg.data.max_length)
        log.info(f"eval: {eval_split.name}; " + eval_stats.summary("eval"))
    if not len(train_rows):
        raise DataError("no preference pairs to train on")
    return tokenizer, setup, {"train_split": train_split, "eval_split": eval_split, "train_rows": train_rows,
                              "eval_rows": eval_rows, "train_stats": train_stats, "eval_stats": eval_stats}


def build_trainer(cfg: Config, model, tokenizer, data, args, out: Path, resume: str | None = None):
    from chattune.training import early_stop, steps
    from chattune.training.callbacks import MetricsLogger
    from chattune.training.dpo import ChattuneDPOTrainer
    from chattune.training.interrupts import ResumeCheck

    signals, control = steps.guards(cfg)
    trainer = ChattuneDPOTrainer(model=model, args=args, train_dataset=data["train_rows"],
                                 eval_dataset=data["eval_rows"], processing_class=tokenizer,
                                 callbacks=[MetricsLogger(out), control, ResumeCheck(resume),
                                            *early_stop.callbacks(cfg)])
    if not trainer.fast_head:
        log.info("this model's LM head is not a plain linear layer: TRL's own log-prob head is used")
    return trainer, signals, control


def score(cfg: Config, trainer, tokenizer, data, state):
    """Log-probabilities of the held-out chosen and rejected replies under the model as it is now (rank 0)."""
    from chattune.evaluation.preferences import score_pairs

    if data["eval_rows"] is None or not cfg.train.eval_baseline or not state.is_main_process:
        return None
    model = trainer.accelerator.unwrap_model(trainer.model)
    return score_pairs(model, data["eval_rows"], tokenizer.pad_token_id, cfg.train.eval_batch_size or
                       cfg.train.batch_size)


def _samples(split, before, after, n: int = N_SAMPLES) -> list[dict]:
    rows = split.dataset.select(range(min(n, len(split.dataset)))).to_list()
    return [{"prompt": r["prompt"], "chosen": r["chosen"][0]["content"], "rejected": r["rejected"][0]["content"],
             "margin_before": float(before[0][i] - before[1][i]) if before is not None else None,
             "margin_after": float(after[0][i] - after[1][i])} for i, r in enumerate(rows)]


def finish(cfg: Config, trainer, tokenizer, data, result, before, out: Path, device: str, precision: str,
           state) -> dict:
    """Final evaluation, held-out pairs scored again, the model directory with results.json, report and card."""
    from chattune.artifacts.dpo_report import write_dpo_card, write_dpo_report
    from chattune.evaluation.preferences import preference_summary
    from chattune.training import steps

    final, stopping = steps.final_evaluation(cfg, trainer, data["eval_rows"] is not None)
    # the trainer's final state: steps and epochs actually run (the last logged step may be earlier)
    train = {**result.metrics, "global_step": trainer.state.global_step, "epoch": trainer.state.epoch}
    results = {"train": train, "eval": final, "max_length": cfg.data.max_length,
               "data": {"train": vars(data["train_stats"]),
                        "eval": vars(data["eval_stats"]) if data["eval_stats"] else None},
               "dpo": dataclasses.asdict(cfg.dpo), "device": device, "precision": precision}
    if before is not None:
        after = score(cfg, trainer, tokenizer, data, state)
        results["preference"] = {"before": preference_summary(*before), "after": preference_summary(*after, *before),
                                 "samples": _samples(data["eval_split"], before, after)}
        log.info(f"held-out preference accuracy {results['preference']['before']['accuracy']:.1%} before, "
                 f"{results['preference']['after']['accuracy']:.1%} after")
    if stopping:
        results["stopping"] = stopping
    steps.save(cfg, trainer, tokenizer, out, results)
    if trainer.is_world_process_zero():
        write_dpo_report(cfg, out, tokenizer, data["train_split"], data["eval_split"])
        write_dpo_card(out)
    return {"output_dir": str(out), "train": train, "eval": final,
            "preference": results.get("preference")}
