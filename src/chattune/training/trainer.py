"""TRL's SFTTrainer, composed with chattune's loss and evaluation.

Two methods are overridden, each for a measured reason: `compute_loss` (the selective LM head:
loss only where labels are not -100, without full-vocabulary logits) and `evaluate` (a mean over
assistant tokens rather than over batches, plus perplexity and accuracy). Checkpoints are written
atomically (checkpoints.AtomicCheckpoints), every micro-batch loss is checked for NaN, and length
grouping covers the global batch (sampling.py).
"""

from __future__ import annotations

import contextlib
import time

import torch
from trl import SFTTrainer

from chattune.data.collate import HOST_KEYS
from chattune.model.load import pick_device
from chattune.model.loss import fast_loss_supported, full_logits_loss_sum, install_selective_head
from chattune.model.speed import (
    install_unpacked_shortcuts,
    is_causal_lm,
    loss_inputs,
    prepare_for_training,
    unpacked_rows,
)
from chattune.training.checkpoints import AtomicCheckpoints
from chattune.training.distributed import pad_to_even_shards
from chattune.training.interrupts import GuardedSteps
from chattune.training.metrics import evaluate_batches, summarize
from chattune.training.sampling import LengthGroupedSampling
from chattune.training.tracking import ThroughputLog


# GuardedSteps: each micro-batch loss to the NaN guard; LengthGroupedSampling: batches grouped over the global batch,
# in an order fixed by (seed, epoch), so N processes and a resumed run see the same batches as one uninterrupted run
class ChattuneTrainer(GuardedSteps, LengthGroupedSampling, ThroughputLog, AtomicCheckpoints, SFTTrainer):
    def __init__(self, *args, **kwargs):
        model = kwargs["model"]
        self.selective = fast_loss_supported(model)
        if self.selective:
            install_selective_head(model.get_base_model() if hasattr(model, "get_base_model") else model)
        # speed-ups that leave what is learned unchanged (speed.py; measured in bench/train_speed.py)
        self.speedups = prepare_for_training(model, pick_device())
        self.causal = is_causal_lm(model)
        self._nonembedding_params = None
        install_unpacked_shortcuts()
        super().__init__(*args, **kwargs)
        # count loss tokens over the whole accumulated step, so every token weighs the same; the Trainer
        # then takes the loss as already scaled for accumulation (and divides it when no count came)
        self.model_accepts_loss_kwargs = True

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        facts = {k: inputs[k] for k in HOST_KEYS if k in inputs}  # what the collator knew on the host
        model_inputs = {k: v for k, v in inputs.items() if k != "labels" and k not in HOST_KEYS}
        if self.selective:
            # right padding under a causal mask changes no real token: the mask can go (SDPA's causal fast path);
            # decided on the host when the collator says so, else by looking at the mask on the device
            unpacked = (facts.get("mask_redundant", False) and self.causal and "position_ids" not in model_inputs)
            if unpacked:
                model_inputs.pop("attention_mask", None)
            elif "mask_redundant" not in facts:
                model_inputs = loss_inputs(model_inputs, labels, self.causal)
            index = {k: facts[k] for k in ("loss_index", "loss_targets", "loss_valid") if k in facts}
            with unpacked_rows() if unpacked else contextlib.nullcontext():
                out = model(**model_inputs, selective_labels=labels, **index)
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

    def _track_num_input_tokens(self, inputs):
        # the collator counted the non-padding tokens on the host (the same number as the attention mask's sum,
        # which the Trainer would add up on the device and read back every micro-batch); with several processes
        # the count of every rank is needed, which only the device's gather gives
        n = inputs.get("num_tokens") if isinstance(inputs, dict) else None
        if (n is None or self.args.include_num_input_tokens_seen != "non_padding"
                or self.accelerator.num_processes > 1):
            return super()._track_num_input_tokens(inputs)
        self.state.num_input_tokens_seen += int(n)

    def floating_point_ops(self, inputs) -> int:
        # the Trainer walks every parameter for this count at every micro-batch; it never changes in a run
        if self._nonembedding_params is None:
            self._nonembedding_params = (self.model.num_parameters(exclude_embeddings=True)
                                         if hasattr(self.model, "num_parameters") else 0)
        ids = inputs.get(getattr(self.model, "main_input_name", "input_ids")) if isinstance(inputs, dict) else None
        return 6 * ids.numel() * self._nonembedding_params if ids is not None else 0

    def create_model_card(self, *args, **kwargs):
        # TRL writes OUTPUT/README.md at every checkpoint, naming no base model for a local path;
        # `chattune push` writes the card from the run's own report instead (publish.build_card)
        return None

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
