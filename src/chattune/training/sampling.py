"""Length-grouped training order that is the same for any number of processes and after a resume.

transformers' LengthGroupedSampler groups by the per-process batch and draws its permutation from
the global torch RNG. So 2 processes of batch B see other batches than 1 process of batch 2B, and a
run resumed in a later epoch sees another order than the run it continues. Here the grouping uses
the global batch (per-device batch x accumulation x processes) and the permutation comes from
(seed, epoch) alone; accelerate then deals the batches out to the processes.
"""

from __future__ import annotations

import torch
from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices


class GlobalLengthGroupedSampler(LengthGroupedSampler):
    def __init__(self, lengths: list[int], global_batch: int, seed: int):
        super().__init__(global_batch, lengths=list(lengths))
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by accelerate's data loader at the start of every epoch."""
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))


def length_grouped_sampler(args, dataset) -> GlobalLengthGroupedSampler:
    """The sampler for a data set with a `length` column, under TrainingArguments `args`."""
    global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * max(1, args.world_size)
    seed = args.data_seed if args.data_seed is not None else args.seed
    return GlobalLengthGroupedSampler(dataset[args.length_column_name], global_batch, seed)


class LengthGroupedSampling:
    """Trainer mixin: a data set with a `length` column is batched by length_grouped_sampler when the arguments
    ask for group_by_length (every chattune trainer: SFT, DPO)."""

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if (self.args.train_sampling_strategy == "group_by_length" and dataset is not None
                and self.args.length_column_name in getattr(dataset, "column_names", [])):
            return length_grouped_sampler(self.args, dataset)
        return super()._get_train_sampler(train_dataset)
