"""One process of the FSDP2 check (test_fsdp_cpu.py): chattune's selective-head loss on a tiny GPT-2 whose blocks
and root are sharded with FSDP2 (torch.distributed.fsdp.fully_shard) over gloo, or unsharded with one process.

    python fsdp2_worker.py OUT.json            # one process, the whole global batch
    torchrun --nproc_per_node 2 fsdp2_worker.py OUT.json

Each step every rank takes its share of the same global batch; the loss is summed over ranks and divided by the
global count of loss tokens (what chattune's compute_loss does with the Trainer's num_items_in_batch), times
the number of processes because FSDP averages gradients over ranks. Rank 0 writes the per-step global loss.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from transformers import GPT2Config, GPT2LMHeadModel

from chattune.data.collate import PadCollator
from chattune.model.loss import install_selective_head

STEPS, GLOBAL_BATCH, PAD = 6, 8, 0


def batches():
    g = torch.Generator().manual_seed(0)
    for _ in range(STEPS):
        rows = []
        for _ in range(GLOBAL_BATCH):
            n = int(torch.randint(8, 40, (1,), generator=g))
            start = int(torch.randint(1, 99, (1,), generator=g))
            ids = [1 + (start + k) % 99 for k in range(n)]  # learnable: each token gives the next
            cut = int(torch.randint(1, n - 1, (1,), generator=g))
            rows.append({"input_ids": ids, "labels": [-100] * cut + ids[cut:]})
        yield rows


def main(out: str) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=100, n_positions=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=0,
                                       eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    install_selective_head(model)
    if world > 1:
        from torch.distributed.fsdp import fully_shard

        for block in model.transformer.h:
            fully_shard(block)
        fully_shard(model)
        assert type(model.lm_head.weight).__name__ == "DTensor"  # sharded between the steps
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    collate = PadCollator(PAD, host_facts=True)
    losses = []
    for rows in batches():
        share = rows[rank::world]
        batch = collate(share)
        out_ = model(input_ids=batch["input_ids"], selective_labels=batch["labels"], loss_index=batch["loss_index"],
                     loss_targets=batch["loss_targets"])
        total = torch.tensor([float(len(batch["loss_index"]))])
        summed = out_["loss_sum"].detach().clone().reshape(1)
        if world > 1:
            dist.all_reduce(total)
            dist.all_reduce(summed)
        (out_["loss_sum"] / total[0] * world).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append((summed / total).item())
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"world": world, "losses": losses}, f)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
