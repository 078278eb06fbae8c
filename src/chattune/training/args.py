"""chattune's config mapped onto the Trainer's arguments: one mapping for every trainer (SFT, DPO)."""

from __future__ import annotations

from chattune.model.load import pick_device
from chattune.training import early_stop
from chattune.training.tracking import report_to_list, run_name


def cuda_kwargs(t) -> dict:
    """What only pays on a CUDA GPU (a CPU run keeps the defaults): one fused AdamW kernel for all parameters
    instead of a loop of foreach kernels (transformers 5's default already; explicit for older ones); batches
    copied from pinned memory without the host waiting for the copy; the next batches collated by worker
    processes while the GPU computes (unless --num-workers says)."""
    kwargs = dict(optim="adamw_torch_fused", accelerator_config={"non_blocking": True})
    if t.num_workers is None:
        kwargs.update(dataloader_num_workers=CUDA_WORKERS, dataloader_prefetch_factor=4,
                      dataloader_persistent_workers=True)
    return kwargs


CUDA_WORKERS = 2


def trainer_kwargs(cfg, precision: str, has_eval: bool, use_cpu: bool) -> dict:
    """transformers TrainingArguments fields from chattune's config: what every trainer (SFT, DPO) shares."""
    t = cfg.train
    eval_strategy = ("steps" if t.eval_steps else "epoch") if has_eval else "no"
    kwargs = dict(
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
        torch_compile=t.compile,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        eval_strategy=eval_strategy,
        eval_steps=t.eval_steps,
        save_strategy="steps" if t.save_steps else "epoch",
        save_steps=t.save_steps or 500,
        save_total_limit=t.save_total_limit,
        # transformers' own tracker integrations; each reads its own environment (tracking.py)
        report_to=report_to_list(t.report_to),
        run_name=run_name(cfg),
        dataloader_num_workers=t.num_workers or 0,
        # page-locked host memory only speeds copies to a GPU; on a CPU it is a wasted copy
        dataloader_pin_memory=not use_cpu,
        include_num_input_tokens_seen="non_padding",
        # rows of similar length share a batch, so little compute goes to padding
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        length_column_name="length",
        remove_unused_columns=False,
        disable_tqdm=False,
        # a NaN must reach the log and the guard, not be replaced by the running mean
        logging_nan_inf_filter=False,
        # every parameter gets a gradient each step; searching for unused ones costs a graph walk
        ddp_find_unused_parameters=False,
    )
    kwargs.update(cuda_kwargs(t) if not use_cpu and pick_device() == "cuda" else {})
    # the best checkpoint by evaluation loss (early stopping, --load-best): a save at every evaluation
    kwargs.update(early_stop.trainer_kwargs(cfg, has_eval))
    return kwargs


def sft_args(cfg, precision: str, has_eval: bool, use_cpu: bool):
    """TRL's SFTConfig for chattune's rows."""
    from trl import SFTConfig

    # the data arrives tokenized, with labels; TRL must not re-tokenize, truncate or pack it
    return SFTConfig(**trainer_kwargs(cfg, precision, has_eval, use_cpu), dataset_kwargs={"skip_prepare_dataset": True},
                     max_length=None, packing=False)


def dpo_args(cfg, precision: str, has_eval: bool, use_cpu: bool):
    """TRL's DPOConfig for chattune's preference rows (tokenized and cut to data.max_length already: the
    collator's own cut is a no-op safety net). Precision and gradient checkpointing come from chattune's config
    like every other setting (TRL's own defaults are bf16, also on a CPU, and checkpointing on)."""
    from trl import DPOConfig

    d = cfg.dpo
    return DPOConfig(**trainer_kwargs(cfg, precision, has_eval, use_cpu), max_length=cfg.data.max_length,
                     beta=d.beta, loss_type=d.loss_types(), precompute_ref_log_probs=d.precompute_ref,
                     disable_dropout=True)
