"""`chattune train`: data -> template + tokens -> model -> SFTTrainer -> a complete model directory.

The data is loaded and validated before any model weights are, so bad input fails in seconds.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from chattune.collate import PadCollator
from chattune.config import Config
from chattune.data import holdout_split, load_conversations
from chattune.errors import ChattuneError, DataError
from chattune.model import (context_length, fit_model_to_tokenizer, load_config, load_for_training, load_model,
                            pick_device, resolve_precision)
from chattune.tokenize import prepare_split

log = logging.getLogger("chattune")
RESULTS_FILE = "results.json"
LOG_FILE = "train.log"


def attach_run_log(output_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(output_dir / LOG_FILE)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    return handler


def resolve_max_length(requested: int | None, context: int | None, model_name: str) -> int:
    if requested is not None:
        if context is not None and requested > context:
            raise ChattuneError(f"--max-length {requested} is longer than {model_name}'s context of {context} tokens; "
                                f"use --max-length {context} or less")
        return requested
    if context is None:
        log.info("the model config states no context length; using max length 1024")
        return 1024
    if context > 4096:
        log.info(f"the model's context is {context} tokens; truncating conversations at 4096 (set --max-length)")
        return 4096
    return context


def resolve_resume(resume, output_dir: Path):
    """None, or the checkpoint directory to continue from."""
    from transformers.trainer_utils import get_last_checkpoint

    if resume in (False, None):
        if output_dir.is_dir() and get_last_checkpoint(str(output_dir)):
            raise ChattuneError(f"{output_dir} already holds checkpoints of an earlier run: pass --resume to continue "
                                "it, or choose another --output-dir")
        return None
    if resume is True:
        last = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
        if last is None:
            raise ChattuneError(f"--resume: no checkpoint in {output_dir} to continue from")
        return last
    path = Path(resume)
    if not path.is_dir():
        raise ChattuneError(f"--resume: checkpoint directory not found: {path}")
    return str(path)


def load_training_data(cfg: Config):
    """Train and eval splits as canonical conversations, validated, before any model is loaded."""
    d = cfg.data
    if not d.dataset:
        raise DataError("no data set given: pass --dataset (a hub id, a local directory or a file)")
    common = dict(fmt=d.format, columns=d.columns, config_name=d.config_name, revision=d.revision,
                  skip_invalid=d.skip_invalid)
    train = load_conversations(d.dataset, d.train_split, max_samples=d.max_train_samples, **common)
    evaluation = None
    if d.eval_split:
        evaluation = load_conversations(d.dataset, d.eval_split, max_samples=d.max_eval_samples, **common)
    elif d.eval_fraction > 0:
        train.dataset, held = holdout_split(train.dataset, d.eval_fraction)
        if d.max_eval_samples is not None and len(held) > d.max_eval_samples:
            held = held.select(range(d.max_eval_samples))
        evaluation = type(train)(dataset=held, format=train.format, name=f"{train.name} (held out)", rejected=[])
    return train, evaluation


def write_rejected(output_dir: Path, *splits) -> int:
    rows = [(s.name, i, reason, raw) for s in splits if s is not None for i, reason, raw in s.rejected]
    if not rows:
        return 0
    with open(output_dir / "rejected.jsonl", "w") as f:
        for name, i, reason, raw in rows:
            f.write(json.dumps({"split": name, "row": i, "reason": reason, "data": raw}, default=str) + "\n")
    return len(rows)


def build_args(cfg: Config, precision: str, has_eval: bool, use_cpu: bool):
    from trl import SFTConfig

    t = cfg.train
    eval_strategy = ("steps" if t.eval_steps else "epoch") if has_eval else "no"
    return SFTConfig(
        output_dir=t.output_dir,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps if t.max_steps is not None else -1,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.eval_batch_size or t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        seed=t.seed,
        data_seed=t.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=use_cpu,
        gradient_checkpointing=t.gradient_checkpointing,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        eval_strategy=eval_strategy,
        eval_steps=t.eval_steps,
        save_strategy="steps" if t.save_steps else "epoch",
        save_steps=t.save_steps or 500,
        save_total_limit=t.save_total_limit,
        report_to="none",
        dataloader_num_workers=t.num_workers,
        include_num_input_tokens_seen="non_padding",
        # rows of similar length share a batch, so little compute goes to padding
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        length_column_name="length",
        # the data arrives tokenized, with labels; TRL must not re-tokenize, truncate or pack it
        dataset_kwargs={"skip_prepare_dataset": True},
        remove_unused_columns=False,
        max_length=None,
        packing=False,
        disable_tqdm=False,
    )


def run_train(cfg: Config) -> dict:
    out = Path(cfg.train.output_dir)
    resume = resolve_resume(cfg.train.resume, out)
    out.mkdir(parents=True, exist_ok=True)
    handler = attach_run_log(out)
    try:
        return _run(cfg, out, resume)
    finally:
        log.removeHandler(handler)
        handler.close()


def _run(cfg: Config, out: Path, resume) -> dict:
    from transformers import set_seed

    train_split, eval_split = load_training_data(cfg)
    log.info(f"data: {train_split.name}, format {train_split.format}, {len(train_split.dataset)} conversations"
             + (f"; eval {eval_split.name}, {len(eval_split.dataset)}" if eval_split else "; no evaluation split"))
    n_rejected = write_rejected(out, train_split, eval_split)
    if n_rejected:
        log.info(f"skipped {n_rejected} invalid row(s); each is in {out / 'rejected.jsonl'} with its reason")

    m = cfg.model
    model_config = load_config(m.name, m.revision, m.trust_remote_code)
    max_length = resolve_max_length(cfg.data.max_length, context_length(model_config), m.name)
    cfg.data.max_length = max_length
    tokenizer, setup = load_for_training(m, log.info)

    kind = "text" if train_split.format == "text" else "messages"
    train_rows, train_stats = prepare_split(train_split.dataset, tokenizer, max_length, kind)
    log.info(train_stats.summary("train"))
    if train_stats.rows_out == 0:
        raise DataError(f"no training conversation keeps an assistant token within --max-length {max_length}; "
                        "raise --max-length")
    eval_rows, eval_stats = None, None
    if eval_split is not None:
        eval_rows, eval_stats = prepare_split(eval_split.dataset, tokenizer, max_length, kind)
        log.info(eval_stats.summary("eval"))
        if eval_stats.rows_out == 0:
            log.warning("no evaluation conversation keeps an assistant token; evaluation is skipped")
            eval_rows = None

    device = pick_device()
    precision, note = resolve_precision(cfg.train.precision, device)
    if note:
        log.warning(note)
    log.info(f"device {device}, precision {precision}, max length {max_length}")
    cfg.save(out)  # the resolved config (max length filled in); holds no secrets

    set_seed(cfg.train.seed)
    model = load_model(m.name, m.revision, m.trust_remote_code)
    fit_model_to_tokenizer(model, tokenizer, setup)

    from chattune.trainer import ChattuneTrainer, MetricsLogger, NonFiniteLossGuard

    metrics_path = out / "metrics.jsonl"
    if resume is None and metrics_path.exists():
        metrics_path.unlink()  # a fresh run starts a fresh log; a resumed one appends
    guard = NonFiniteLossGuard()
    args = build_args(cfg, precision, eval_rows is not None, use_cpu=device == "cpu")
    trainer = ChattuneTrainer(
        model=model, args=args, train_dataset=train_rows, eval_dataset=eval_rows, processing_class=tokenizer,
        data_collator=PadCollator(tokenizer.pad_token_id, pad_to_multiple_of=8 if device == "cuda" else None),
        callbacks=[MetricsLogger(out), guard],
    )
    if resume:
        log.info(f"resuming from {resume}")
    result = trainer.train(resume_from_checkpoint=resume)
    if guard.bad_step is not None:
        raise ChattuneError(f"the loss became NaN or infinite at step {guard.bad_step}; training stopped. Lower --lr "
                            "or check the data; the last good checkpoint is kept in the output directory")
    final = trainer.evaluate() if eval_rows is not None else {}
    if trainer.is_world_process_zero():
        trainer.save_model(str(out))
        tokenizer.save_pretrained(str(out))
        results = {"train": result.metrics, "eval": final, "max_length": max_length,
                   "data": {"train": vars(train_stats), "eval": vars(eval_stats) if eval_stats else None},
                   "device": device, "precision": precision}
        (out / RESULTS_FILE).write_text(json.dumps(results, indent=2, default=str))
        log.info(f"model saved to {out}" + (f"; eval loss {final['eval_loss']:.4f}, perplexity "
                                             f"{final['eval_perplexity']:.2f}" if final else ""))
    return {"output_dir": str(out), "train": result.metrics, "eval": final}
