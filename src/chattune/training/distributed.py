"""What `chattune train` needs to know when torchrun or accelerate launch starts it N times.

The engine is accelerate's (through the Trainer): DDP, FSDP or DeepSpeed come from the launcher
and its config file. chattune only sets the process state up before the data is read, so that
rank 0 prepares data first (the others then read its cache), and only rank 0 writes files and
logs.
"""

from __future__ import annotations

import contextlib
import logging

import torch

from chattune.outputs import IGNORE_INDEX

log = logging.getLogger("chattune")


def process_state(device: str):
    """accelerate's PartialState for this process (one process: no process group, no cost).

    Created with the Trainer's own device choice; the Trainer later rebuilds its state and reuses
    the process group started here.
    """
    from accelerate import PartialState

    state = PartialState(cpu=device == "cpu")
    if state.num_processes > 1:
        log.info(f"process {state.process_index} of {state.num_processes} ({state.distributed_type.value}, "
                 f"{state.device})")
    return state


@contextlib.contextmanager
def quiet_unless_main(state):
    """Only rank 0 reports progress; the others still report errors."""
    level = log.level
    if not state.is_main_process:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def any_rank(flags: list[bool], device) -> list[bool]:
    """Each flag set on any process is set on all of them (one small all-reduce; free with one process).

    Decisions taken at a step boundary (save, stop) must agree, or ranks would wait on each other for ever."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1):
        return flags
    t = torch.tensor([float(f) for f in flags], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def pad_to_even_shards(dataset, multiple: int, pad_token_id: int):
    """Append rows that carry no loss until len(dataset) is a multiple of processes x batch size.

    accelerate gives every process the same number of evaluation batches (FSDP and ZeRO-3 need it)
    by repeating samples from the start, which a sum over tokens would count twice; rows whose
    labels are all -100 fill the gap instead and add nothing to any sum.
    """
    from datasets import Dataset, concatenate_datasets

    missing = -len(dataset) % multiple
    if missing == 0:
        return dataset
    filler = {}
    for name in dataset.column_names:
        if name == "input_ids":
            filler[name] = [[pad_token_id]] * missing
        elif name == "labels":
            filler[name] = [[IGNORE_INDEX]] * missing
        elif name == "attention_mask":
            filler[name] = [[1]] * missing
        elif name == "length":
            filler[name] = [1] * missing
        else:
            filler[name] = [dataset[0][name]] * missing
    return concatenate_datasets([dataset, Dataset.from_dict(filler, features=dataset.features)])
