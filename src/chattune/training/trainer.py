"""TRL's SFTTrainer, composed with chattune's loss and evaluation.

Two methods are overridden, each for a measured reason: `compute_loss` (the selective LM head:
loss only where labels are not -100, without full-vocabulary logits) and `evaluate` (a mean over
assistant tokens rather than over batches, plus perplexity and accuracy). Checkpoints are written
atomically (checkpoints.AtomicCheckpoints), every micro-batch loss is checked for NaN, and length
grouping covers the global batch (sampling.py).
"""

from __future__ import annotations

import time

import torch
from trl import SFTTrainer

from chattune.model.load import pick_device
from chattune.model.loss import fast_loss_supported, full_logits_loss_sum, install_selective_head
from chattune.model.speed import is_causal_lm, loss_inputs, prepare_for_training
from chattune.training.checkpoints import AtomicCheckpoints
from chattune.training.distributed import pad_to_even_shards
from chattune.training.interrupts import StepControl
from chattune.training.metrics import evaluate_batches, summarize
from chattune.training.sampling import length_grouped_sampler
from chattune.training.tracking import ThroughputLog


class ChattuneTrainer(ThroughputLog, AtomicCheckpoints, SFTTrainer):
    def __init__(self, *args, **kwargs):
        model = kwargs["model"]
        self.selective = fast_loss_supported(model)
        if self.selective:
            install_selective_head(model.get_base_model() if hasattr(model, "get_base_model") else model)
        # speed-ups that leave what is learned unchanged (speed.py; measured in bench/train_speed.py)
        self.speedups = prepare_for_training(model, pick_device())
        self.causal = is_causal_lm(model)
        super().__init__(*args, **kwargs)
        # count loss tokens over the whole accumulated step, so every token weighs the same; the Trainer
        # then takes the loss as already scaled for accumulation (and divides it when no count came)
        self.model_accepts_loss_kwargs = True

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        if self.selective:
            # right padding under a causal mask changes no real token: the mask can go (SDPA's causal fast path)
            out = model(**loss_inputs(model_inputs, labels, self.causal), selective_labels=labels)
            loss_sum, n = out["loss_sum"], out["n_tokens"]
        else:
            loss_sum, n, _ = full_logits_loss_sum(model, model_inputs["input_ids"], model_inputs.get("attention_mask"),
                                                  labels)
        denom = num_items_in_batch if num_items_in_batch is not None else n.clamp(min=1)
        loss = loss_sum / torch.as_tensor(denom, device=loss_sum.device).clamp(min=1)
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            # the count covers every rank and DDP averages gradients over ranks
            loss = loss * self.accelerator.num_processes
        return (loss, {"loss": loss}) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, StepControl):  # it stops the run at the step whose loss is not finite
                callback.observe_loss(loss)
        return loss

    def create_model_card(self, *args, **kwargs):
        # TRL writes OUTPUT/README.md at every checkpoint, naming no base model for a local path;
        # `chattune push` writes the card from the run's own report instead (publish.build_card)
        return None

    def _get_train_sampler(self, train_dataset=None):
        # grouped over the global batch, in an order fixed by (seed, epoch): N processes train on the
        # same batches as one process with the same global batch, and a resumed run as an uninterrupted one
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if (self.args.train_sampling_strategy == "group_by_length" and dataset is not None
                and self.args.length_column_name in getattr(dataset, "column_names", [])):
            return length_grouped_sampler(self.args, dataset)
        return super()._get_train_sampler(train_dataset)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            return {}
        start = time.perf_counter()
        if self.accelerator.num_processes > 1 and hasattr(dataset, "column_names"):
            dataset = pad_to_even_shards(dataset, self.accelerator.num_processes * self.args.eval_batch_size,
                                         self.processing_class.pad_token_id)
        loader = self.get_eval_dataloader(dataset)
        model = self.accelerator.unwrap_model(self.model)
        totals = evaluate_batches(model, loader, device=self.args.device,
                                  autocast=self.autocast_smart_context_manager)
        if self.accelerator.num_processes > 1:
            totals = self.accelerator.reduce(totals, reduction="sum")
        stats = summarize(*totals.tolist())
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in stats.items()}
        metrics[f"{metric_key_prefix}_runtime"] = round(time.perf_counter() - start, 3)
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics
