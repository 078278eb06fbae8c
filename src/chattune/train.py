"""`chattune train`: data -> template + tokens -> model -> SFTTrainer -> a complete model directory.

The data is loaded and validated before any model weights are, so bad input fails in seconds.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from chattune import adapters
from chattune.checkpoints import CheckpointError, check_resume_target, checkpoint_dirs, discard_staging, newest_complete
from chattune.collate import PadCollator
from chattune.config import Config
from chattune.distributed import process_state, quiet_unless_main
from chattune.errors import ChattuneError
from chattune.model import (context_length, fit_model_to_tokenizer, load_config, load_for_training, load_model,
                            pick_device, resolve_precision)
from chattune.prepared import prepare_training_data
from chattune.report import write_run_report

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
    """None, or the checkpoint to continue from: the newest complete one, or the one named."""
    if resume in (False, None):
        if checkpoint_dirs(output_dir):
            raise ChattuneError(f"{output_dir} already holds checkpoints of an earlier run: pass --resume to continue "
                                "it, or choose another --output-dir")
        return None
    if resume is True:
        found, skipped = newest_complete(output_dir)
        for path, reason in skipped:
            log.warning(f"skipping {path.name}: {reason}")
        if found is None:
            raise CheckpointError(f"--resume: no complete checkpoint in {output_dir} to continue from"
                                  + (f" ({len(skipped)} incomplete skipped)" if skipped else ""))
        return str(found)
    path = Path(resume)
    check_resume_target(path)
    return str(path)


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
        # page-locked host memory only speeds copies to a GPU; on a CPU it is a wasted copy
        dataloader_pin_memory=not use_cpu,
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
        # a NaN must reach the log and the guard, not be replaced by the running mean
        logging_nan_inf_filter=False,
        # every parameter gets a gradient each step; searching for unused ones costs a graph walk
        ddp_find_unused_parameters=False,
    )


def run_train(cfg: Config) -> dict:
    out = Path(cfg.train.output_dir)
    if cfg.lora.qlora:
        adapters.check_qlora_available()
    if adapters.is_adapter_dir(cfg.model.name):
        raise ChattuneError(f"{cfg.model.name} is a LoRA adapter, not a model: merge it first (chattune merge "
                            f"{cfg.model.name} --output-dir DIR) and train from DIR")
    state = process_state(pick_device())
    with quiet_unless_main(state):
        resume = resolve_resume(cfg.train.resume, out)
        state.wait_for_everyone()  # every process has chosen the checkpoint before rank 0 tidies up
        handler = None
        if state.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
            discard_staging(out)
            handler = attach_run_log(out)
        state.wait_for_everyone()
        try:
            return _run(cfg, out, resume, state)
        finally:
            if handler is not None:
                log.removeHandler(handler)
                handler.close()


def _run(cfg: Config, out: Path, resume, state) -> dict:
    from transformers import set_seed

    m = cfg.model
    model_config = load_config(m.name, m.revision, m.trust_remote_code)
    max_length = resolve_max_length(cfg.data.max_length, context_length(model_config), m.name)
    cfg.data.max_length = max_length
    tokenizer, setup = load_for_training(m, log.info)

    # data is validated and tokenized (or found in the prepared-data cache) before any weights load;
    # rank 0 goes first and fills the cache, the other processes then read it
    with state.main_process_first():
        data = prepare_training_data(cfg, tokenizer, max_length, out, main=state.is_main_process)
    train_split, eval_split = data.train_split, data.eval_split
    train_rows, train_stats, eval_rows, eval_stats = data.train_rows, data.train_stats, data.eval_rows, data.eval_stats
    log.info(train_stats.summary("train"))
    if eval_stats is not None:
        log.info(eval_stats.summary("eval"))
        if eval_stats.rows_out == 0:
            log.warning("no evaluation conversation keeps an assistant token; evaluation is skipped")
            eval_rows = None

    device = pick_device()
    precision, note = resolve_precision(cfg.train.precision, device)
    if note:
        log.warning(note)
    log.info(f"device {device}, precision {precision}, max length {max_length}")
    if state.is_main_process:
        cfg.save(out)  # the resolved config (max length filled in); holds no secrets

    lora = cfg.lora.enabled or cfg.lora.qlora
    if lora and cfg.train.lr < 5e-5:
        log.info(f"LoRA usually needs a higher learning rate than full fine-tuning (e.g. --lr 2e-4); this run uses "
                 f"{cfg.train.lr:g}")
    set_seed(cfg.train.seed)
    model = load_model(m.name, m.revision, m.trust_remote_code,
                       quantization_config=adapters.quantization_config() if cfg.lora.qlora else None)
    rows_before = model.get_input_embeddings().weight.shape[0]
    fit_model_to_tokenizer(model, tokenizer, setup)
    if cfg.train.attention_dropout is not None:
        from chattune.speed import set_attention_dropout

        n = set_attention_dropout(model, cfg.train.attention_dropout)
        log.info(f"attention dropout {cfg.train.attention_dropout} in {n} layers (the saved config keeps the model's)")
    args = build_args(cfg, precision, eval_rows is not None, use_cpu=device == "cpu")
    if lora:
        model = adapters.wrap(model, cfg.lora, adapters.new_token_ids(tokenizer, setup.added_tokens, rows_before),
                              m.name, m.revision, args)

    from chattune.interrupts import StepControl, StopSignals, interrupted_error, nonfinite_error
    from chattune.memory import estimate, report
    from chattune.trainer import ChattuneTrainer, MetricsLogger

    metrics_path = out / "metrics.jsonl"
    if resume is None and metrics_path.exists() and state.is_main_process:
        metrics_path.unlink()  # a fresh run starts a fresh log; a resumed one appends
    signals = StopSignals()
    control = StepControl(signals, cfg.train.save_minutes)
    trainer = ChattuneTrainer(
        model=model, args=args, train_dataset=train_rows, eval_dataset=eval_rows, processing_class=tokenizer,
        data_collator=PadCollator(tokenizer.pad_token_id, pad_to_multiple_of=8 if device == "cuda" else None),
        callbacks=[MetricsLogger(out), control],
    )
    report(estimate(trainer.model, cfg.train.batch_size, max_length, precision, cfg.train.gradient_checkpointing,
                    device, selective_head=trainer.selective))
    if resume:
        log.info(f"resuming from {resume}")
    with signals:
        result = trainer.train(resume_from_checkpoint=resume)
    if control.nonfinite_step is not None:
        raise nonfinite_error(control.nonfinite_step, out)
    if control.stopped_at is not None:
        raise interrupted_error(control, out, quiet=not state.is_main_process)
    final = trainer.evaluate() if eval_rows is not None else {}
    trainer.save_model(str(out))  # every process: FSDP and ZeRO-3 gather the weights for rank 0
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(out))
        if lora:
            adapters.save_extras(trainer.model, out)
        results = {"train": result.metrics, "eval": final, "max_length": max_length,
                   "data": {"train": vars(train_stats), "eval": vars(eval_stats) if eval_stats else None},
                   "device": device, "precision": precision}
        (out / RESULTS_FILE).write_text(json.dumps(results, indent=2, default=str))
        log.info(f"model saved to {out}" + (f"; eval loss {final['eval_loss']:.4f}, perplexity "
                                             f"{final['eval_perplexity']:.2f}" if final else ""))
        if lora and cfg.lora.merge:
            merged = adapters.merge_adapter(out, out / adapters.MERGED_DIR, overwrite=True,
                                            trust_remote_code=m.trust_remote_code)
            log.info(f"merged model (adapter and base in one) written to {merged}")
        write_run_report(cfg, out, tokenizer, train_split, eval_split, eval_rows)
    return {"output_dir": str(out), "train": result.metrics, "eval": final}
