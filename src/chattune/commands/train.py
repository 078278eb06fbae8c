"""`chattune train`: supervised fine-tuning on chat data, as a recipe of named steps.

(Like every command module, it imports the library inside its functions: `chattune --help` and flag errors
must not wait seconds for torch and transformers to import.)

prepare the data (validated and tokenized before any weights load, so bad input fails in seconds) ->
build the model -> build the trainer (TRL's SFTTrainer with chattune's loss) -> train -> finish (the
model directory, results, report).
"""

from __future__ import annotations

import logging
from pathlib import Path

from chattune.commands import add_config_arguments, config_from_args
from chattune.config import Config, validate
from chattune.verbosity import quiet

log = logging.getLogger("chattune")


def add_arguments(parser) -> None:
    add_config_arguments(parser)


def run(args) -> int:
    from chattune.training.rundir import check_output_dir

    cfg = config_from_args(args)
    check_output_dir(cfg)  # a refused --output-dir answers before run_train's heavy imports (@quiet)
    run_train(cfg)
    return 0


@quiet
def run_train(cfg: Config) -> dict:
    """Fine-tune as `cfg` says; returns the output directory and the final metrics."""
    from chattune.training.rundir import check_output_dir

    cfg = validate(cfg)
    check_output_dir(cfg)  # before any data or weights load (checked again under the lock)
    from chattune.training import steps
    from chattune.training.args import sft_args

    steps.check_model_kind(cfg)
    steps.check_tracking_and_stopping(cfg)
    with steps.run_directory(cfg) as (state, resume):
        out = Path(cfg.train.output_dir)
        tokenizer, setup, data = prepare_data(cfg, out, state)
        device, precision = steps.device_and_precision(cfg)
        log.info(f"device {device}, precision {precision}, max length {cfg.data.max_length}")
        auto = cfg.train.batch_size == "auto"
        if auto:
            from chattune.model.batch_size import DEFAULT_MICRO

            cfg.train.batch_size = DEFAULT_MICRO  # until the probe below, on CUDA, chooses
        if state.is_main_process:
            cfg.save(out)  # the resolved config (max length filled in); holds no secrets
        args = sft_args(cfg, precision, data.eval_rows is not None, use_cpu=device == "cpu")
        model = steps.build_model(cfg, tokenizer, setup, args)
        if auto:
            args = auto_batch_size(cfg, model, device, precision, state, out, data) or args
        trainer, signals, control = build_trainer(cfg, model, tokenizer, data, args, device, precision, out, resume)
        result = steps.train(trainer, signals, control, resume, out, state)
        return finish(cfg, trainer, tokenizer, data, result, out, device, precision)


def auto_batch_size(cfg: Config, model, device: str, precision: str, state, out: Path, data):
    """--batch-size auto: choose the layout (model/batch_size.py), log it, and return the Trainer's arguments for
    it (None when it is the provisional one)."""
    from chattune.model.batch_size import auto_layout
    from chattune.training.args import sft_args

    layout = auto_layout(model, cfg, device, precision, state.num_processes)
    log.info(f"batch size auto: {layout.describe()}")
    if (layout.batch, layout.accum) == (cfg.train.batch_size, cfg.train.grad_accum):
        return None
    cfg.train.batch_size, cfg.train.grad_accum = layout.batch, layout.accum
    if state.is_main_process:
        cfg.save(out)
    return sft_args(cfg, precision, data.eval_rows is not None, use_cpu=device == "cpu")


def prepare_data(cfg: Config, out: Path, state):
    """Tokenizer with its chat template, and the run's rows (from the prepared-data cache when an earlier run
    made the same); rank 0 goes first and fills the cache, the other processes then read it."""
    from chattune.data.prepared import prepare_training_data
    from chattune.model.hub import load_config
    from chattune.model.load import context_length, load_for_training, resolve_max_length

    m = cfg.model
    cfg.data.max_length = resolve_max_length(cfg.data.max_length,
                                             context_length(load_config(m.name, m.revision, m.trust_remote_code)),
                                             m.name)
    tokenizer, setup = load_for_training(m, log.info)
    with state.main_process_first():
        data = prepare_training_data(cfg, tokenizer, cfg.data.max_length, out, main=state.is_main_process)
    log.info(data.train_stats.summary("train"))
    if data.eval_stats is not None:
        log.info(data.eval_stats.summary("eval"))
        if data.eval_stats.rows_out == 0:
            log.warning("no evaluation conversation keeps an assistant token; evaluation is skipped")
            data.eval_rows = None
    return tokenizer, setup, data


def training_collator(cfg: Config, tokenizer, device: str):
    """Right-padded batches that also carry what the host knows about them (collate.py); on CUDA lengths padded
    to multiples of 8 (tensor cores), or to a few fixed lengths with --fixed-shapes (a compiled step)."""
    from chattune.data.collate import PadCollator, length_buckets

    buckets = length_buckets(cfg.data.max_length) if cfg.train.fixed_shapes or cfg.train.compile else None
    return PadCollator(tokenizer.pad_token_id, pad_to_multiple_of=8 if device == "cuda" else None, host_facts=True,
                       buckets=buckets)


def build_trainer(cfg: Config, model, tokenizer, data, args, device: str, precision: str, out: Path,
                  resume: str | None = None):
    from chattune.model.memory import estimate, report
    from chattune.training import early_stop, steps
    from chattune.training.callbacks import MetricsLogger
    from chattune.training.interrupts import ResumeCheck
    from chattune.training.trainer import ChattuneTrainer

    signals, control = steps.guards(cfg)
    trainer = ChattuneTrainer(
        model=model, args=args, train_dataset=data.train_rows, eval_dataset=data.eval_rows, processing_class=tokenizer,
        data_collator=training_collator(cfg, tokenizer, device),
        callbacks=[MetricsLogger(out), control, ResumeCheck(resume), *early_stop.callbacks(cfg)],
    )
    report(estimate(trainer.model, cfg.train.batch_size, cfg.data.max_length, precision,
                    cfg.train.gradient_checkpointing, device, selective_head=trainer.selective))
    return trainer, signals, control


def finish(cfg: Config, trainer, tokenizer, data, result, out: Path, device: str, precision: str) -> dict:
    """Final evaluation, the model directory with results.json, and the run report."""
    from chattune.artifacts.report import write_run_report
    from chattune.training import steps

    final, stopping = steps.final_evaluation(cfg, trainer, data.eval_rows is not None)
    # the trainer's final state: steps and epochs actually run (the last logged step may be earlier)
    train = {**result.metrics, "global_step": trainer.state.global_step, "epoch": trainer.state.epoch}
    results = {"train": train, "eval": final, "max_length": cfg.data.max_length,
               "data": {"train": vars(data.train_stats), "eval": vars(data.eval_stats) if data.eval_stats else None},
               "device": device, "precision": precision}
    if stopping:
        results["stopping"] = stopping
    steps.save(cfg, trainer, tokenizer, out, results)
    if trainer.is_world_process_zero():
        write_run_report(cfg, out, tokenizer, data.train_split, data.eval_split, data.eval_rows)
    return {"output_dir": str(out), "train": train, "eval": final}
